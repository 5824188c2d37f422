"""Reading diffusers-format checkpoint directories (config.json + safetensors, single file or sharded).

Generic pieces shared by the transformer and VAE loaders: every missing, unexpected or mis-shaped key is reported
in one error, and a truncated or corrupt file gives a clear error naming the file. No diffusers import.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Tuple

import torch


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded: what is wrong, and where."""


def read_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: no config.json (expected a diffusers-format model directory)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None


def _safetensors_files(path: str) -> list[str]:
    index = [f for f in os.listdir(path) if f.endswith(".safetensors.index.json")]
    if index:
        idx_path = os.path.join(path, index[0])
        try:
            with open(idx_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{idx_path}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise CheckpointError(f"{path}: shards named in {index[0]} are missing: {missing}")
        return [os.path.join(path, f) for f in files]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no .safetensors file (only safetensors checkpoints are supported)")
    if len(files) > 1:
        raise CheckpointError(f"{path}: several .safetensors files {files} but no *.safetensors.index.json")
    return [os.path.join(path, files[0])]


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """All tensors of a diffusers model directory, on CPU, in their stored dtype."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory")
    state: Dict[str, torch.Tensor] = {}
    for file in _safetensors_files(path):
        try:
            part = load_file(file)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{file}: cannot be read, the file is truncated or corrupt ({e})") from None
        state.update(part)
    return state


def read_checkpoint(path: str) -> Tuple[dict, Dict[str, torch.Tensor]]:
    return read_config(path), read_state_dict(path)


def check_state_dict(expected: Dict[str, torch.Size], got: Dict[str, torch.Tensor], where: str) -> None:
    """Raise one CheckpointError listing every missing, unexpected and mis-shaped key."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = sorted(f"{k}: checkpoint {tuple(got[k].shape)}, model {tuple(expected[k])}"
                    for k in set(expected) & set(got) if tuple(got[k].shape) != tuple(expected[k]))
    if missing or unexpected or shapes:
        lines = [f"{where}: the checkpoint does not fit the model"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise CheckpointError("\n".join(lines))
