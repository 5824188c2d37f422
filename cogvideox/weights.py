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


def parse_config(path: str, raw: dict, from_diffusers_config):
    """config.json's dict -> our config dataclass; an unsupported config is a CheckpointError naming the file."""
    try:
        return from_diffusers_config(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{os.path.join(path, 'config.json')}: {e}") from None


def assign_state(model, state: Dict[str, torch.Tensor], dtype: torch.dtype | None, device):
    """Load a checked state dict into a meta-device model, in eval mode.

    dtype None keeps the checkpoint's dtype when all its tensors share one (the 5B checkpoints are bf16), else
    float32."""
    if dtype is None:
        stored = {t.dtype for t in state.values()}
        dtype = stored.pop() if len(stored) == 1 else torch.float32
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval()


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


# ---- transformer -------------------------------------------------------------------------------------------
# diffusers checkpoint -> CogVideoXTransformer, the only re-layouts (everything else is the identity):
#   attn1.to_q/to_k/to_v.{weight,bias}  ->  attn1.to_qkv.{weight,bias}   rows [q | k | v]
#   attn1.to_out.0.*                    ->  attn1.to_out.*
#   norm{1,2}.linear.*  rows [vision shift, scale, gate | text ...] -> [text | vision]  (expert 0 = text)
#   patch_embed.proj.weight (1.0 conv: D, C, p, p) -> (D, C*p*p)  (the patch embedding is one Linear)

def _qkv_parts(key: str):
    return [key.replace(".to_qkv.", f".to_{n}.") for n in "qkv"]


def _diffusers_shapes(model_shapes: Dict[str, torch.Size], config) -> Dict[str, torch.Size]:
    """The keys and shapes a diffusers checkpoint for this model must hold."""
    out = {}
    for key, shape in model_shapes.items():
        if ".to_qkv." in key:
            out.update({k: torch.Size([shape[0] // 3, *shape[1:]]) for k in _qkv_parts(key)})
        elif ".to_out." in key:
            out[key.replace(".to_out.", ".to_out.0.")] = shape
        elif key == "patch_embed.proj.weight" and config.patch_size_t is None:
            p = config.patch_size
            out[key] = torch.Size([shape[0], config.in_channels, p, p])
        else:
            out[key] = shape
    return out


def transformer_state_from_diffusers(state: Dict[str, torch.Tensor], model_keys, config) -> Dict[str, torch.Tensor]:
    """Re-lay out a (checked) diffusers state dict into CogVideoXTransformer's keys."""
    out = {}
    for key in model_keys:
        if ".to_qkv." in key:
            out[key] = torch.cat([state[k] for k in _qkv_parts(key)], dim=0)
        elif ".to_out." in key:
            out[key] = state[key.replace(".to_out.", ".to_out.0.")]
        elif ".norm1.linear." in key or ".norm2.linear." in key:
            vision, text = state[key].chunk(2, dim=0)
            out[key] = torch.cat([text, vision], dim=0)
        elif key == "patch_embed.proj.weight":
            out[key] = state[key].flatten(1)
        else:
            out[key] = state[key]
    return out


def load_transformer(path: str, dtype: torch.dtype | None = None, device=None, use_kernels: bool | None = None):
    """A diffusers-format CogVideoXTransformer3DModel directory -> CogVideoXTransformer (eval mode).

    dtype None keeps the checkpoint's dtype when all its tensors share one (the 5B checkpoints are bf16), else
    float32. Every missing, unexpected or mis-shaped key is reported in one CheckpointError.
    """
    from .config import TransformerConfig
    from .transformer import CogVideoXTransformer

    raw_config, state = read_checkpoint(path)
    config = parse_config(path, raw_config, TransformerConfig.from_diffusers_config)
    with torch.device("meta"):
        model = CogVideoXTransformer(config, use_kernels=use_kernels)
    model_shapes = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(_diffusers_shapes(model_shapes, config), state, path)
    return assign_state(model, transformer_state_from_diffusers(state, model_shapes, config), dtype, device)
