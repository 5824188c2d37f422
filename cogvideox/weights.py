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


def read_json(file: str, what: str) -> dict:
    """A JSON object from `file`; anything else (not UTF-8, not JSON, a list, null) is a CheckpointError naming it."""
    try:
        with open(file, "rb") as f:
            text = f.read().decode("utf-8")
        data = json.loads(text)
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{file}: not UTF-8 text ({e})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{file}: cannot be read ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: {what} must be a JSON object, got {type(data).__name__} "
                              f"({json.dumps(data)[:60]})")
    return data


def read_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: no config.json (expected a diffusers-format model directory)")
    return read_json(cfg_path, "a model config")


def _inside(path: str, name: str, where: str) -> str:
    """path/name, refused unless its real path (symlinks resolved) lies inside path's real path: an index or a
    symlink must not make the loader read files outside the checkpoint folder."""
    root = os.path.realpath(path)
    file = os.path.realpath(os.path.join(path, name))
    if os.path.isabs(name) or os.path.commonpath([root, file]) != root or file == root:
        raise CheckpointError(f"{where}: {name!r} is outside the checkpoint folder {path} (only files inside it "
                              f"are read)")
    return file


def _safetensors_files(path: str) -> list[str]:
    index = sorted(f for f in os.listdir(path) if f.endswith(".safetensors.index.json"))
    if len(index) > 1:
        raise CheckpointError(f"{path}: several safetensors indexes {index}; keep one")
    if index:
        idx_path = os.path.join(path, index[0])
        weight_map = read_json(idx_path, "a safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in weight_map.items()):
            raise CheckpointError(f"{idx_path}: not a valid safetensors index (weight_map must be an object of "
                                  f"tensor name -> file name, got {type(weight_map).__name__})")
        files = sorted(set(weight_map.values()))
        paths = [_inside(path, f, idx_path) for f in files]
        missing = [f for f, p in zip(files, paths) if not os.path.isfile(p)]
        if missing:
            raise CheckpointError(f"{path}: shards named in {index[0]} are missing: {missing}")
        return paths
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no .safetensors file (only safetensors checkpoints are supported)")
    if len(files) > 1:
        raise CheckpointError(f"{path}: several .safetensors files {files} but no *.safetensors.index.json")
    return [_inside(path, files[0], path)]


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """All tensors of a diffusers model directory, on CPU, in their stored dtype. A tensor stored in two shards is
    an error (which copy is right cannot be known)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory")
    state: Dict[str, torch.Tensor] = {}
    origin: Dict[str, str] = {}
    for file in _safetensors_files(path):
        try:
            part = load_file(file)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{file}: cannot be read, the file is truncated or corrupt ({e})") from None
        twice = sorted(set(part) & set(state))
        if twice:
            raise CheckpointError(f"{path}: {len(twice)} tensor(s) stored in two shards: "
                                  + ", ".join(f"{k} ({os.path.basename(origin[k])}, {os.path.basename(file)})"
                                              for k in twice[:20]) + (" ..." if len(twice) > 20 else ""))
        state.update(part)
        origin.update(dict.fromkeys(part, file))
    return state


def read_checkpoint(path: str) -> Tuple[dict, Dict[str, torch.Tensor]]:
    return read_config(path), read_state_dict(path)


def parse_config(path: str, raw: dict, from_diffusers_config):
    """config.json's dict -> our config dataclass; an unsupported config is a CheckpointError naming the file."""
    try:
        return from_diffusers_config(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{os.path.join(path, 'config.json')}: {e}") from None


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_dtype(dtype) -> None:
    """The loaders' `dtype` argument: None or a floating torch.dtype (checked before any file is read)."""
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be None or a torch.dtype such as torch.bfloat16, got {dtype!r} "
                        f"({type(dtype).__name__})")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be a floating dtype ({', '.join(map(str, FLOAT_DTYPES))}), got {dtype}")


def assign_state(model, state: Dict[str, torch.Tensor], dtype: torch.dtype | None, device):
    """Load a checked state dict into a meta-device model, in eval mode.

    dtype None keeps the checkpoint's dtype when all its tensors share one (the 5B checkpoints are bf16), else
    float32."""
    check_dtype(dtype)
    if dtype is None:
        stored = {t.dtype for t in state.values()}
        dtype = stored.pop() if len(stored) == 1 else torch.float32
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval()


def check_state_dict(expected: Dict[str, torch.Size], got: Dict[str, torch.Tensor], where: str) -> None:
    """Raise one CheckpointError listing every missing, unexpected, mis-shaped and non-floating key (every weight
    of these models is floating point: an int8 or bool tensor would be cast to float silently, not dequantized)."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = sorted(f"{k}: checkpoint {tuple(got[k].shape)}, model {tuple(expected[k])}"
                    for k in set(expected) & set(got) if tuple(got[k].shape) != tuple(expected[k]))
    dtypes = sorted(f"{k}: {v.dtype}" for k, v in got.items() if not v.is_floating_point())
    if missing or unexpected or shapes or dtypes:
        lines = [f"{where}: the checkpoint does not fit the model"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes),
                             ("not floating point", dtypes)):
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

    check_dtype(dtype)
    config = parse_config(path, read_config(path), TransformerConfig.from_diffusers_config)   # before the tensors
    state = read_state_dict(path)
    with torch.device("meta"):
        model = CogVideoXTransformer(config, use_kernels=use_kernels)
    model_shapes = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(_diffusers_shapes(model_shapes, config), state, path)
    return assign_state(model, transformer_state_from_diffusers(state, model_shapes, config), dtype, device)
