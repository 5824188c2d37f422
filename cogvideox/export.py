"""Writing our models as diffusers-format directories (config.json + safetensors under diffusers' key names).

`save_transformer(model, dir)` is the inverse of `weights.load_transformer`: what it writes loads back into
CogVideoXTransformer bit-exactly and into `diffusers.CogVideoXTransformer3DModel.from_pretrained(dir)`. The
re-layouts undone here (weights.py lists them the other way round):
    attn1.to_qkv.{weight,bias}  rows [q | k | v]  ->  attn1.to_q / to_k / to_v
    attn1.to_out.*                                ->  attn1.to_out.0.*
    norm{1,2}.linear.*  rows [text | vision]      ->  [vision | text]   (diffusers stores vision first)
    patch_embed.proj.weight (D, C*p*p)            ->  (D, C, p, p)      (the 1.0 patch conv; 1.5's is a Linear)
`save_vae` writes a CogVideoXVAE, whose keys already are diffusers'.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict

import torch

DIFFUSERS_VERSION = "0.42.1"   # the diffusers release our numerics follow (config.json's _diffusers_version)
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def transformer_config_to_diffusers(config) -> dict:
    """TransformerConfig -> diffusers' config.json dict (our field names are its keys; plus the hard-coded ones)."""
    from .config import _DIFFUSERS_FIXED

    return {"_class_name": "CogVideoXTransformer3DModel", "_diffusers_version": DIFFUSERS_VERSION,
            **dataclasses.asdict(config), **_DIFFUSERS_FIXED}


def transformer_state_to_diffusers(state: Dict[str, torch.Tensor], config) -> Dict[str, torch.Tensor]:
    """CogVideoXTransformer state dict -> diffusers' keys and layouts (contiguous copies, safe to serialize)."""
    out = {}
    for key, t in state.items():
        if ".attn_temporal." in key:
            raise ValueError("attention_layout='2d+1d' has no diffusers equivalent (attn_temporal); only '3d' "
                             "models can be exported")
        if ".to_qkv." in key:
            for name, part in zip("qkv", t.chunk(3, dim=0)):
                out[key.replace(".to_qkv.", f".to_{name}.")] = part
        elif ".to_out." in key:
            out[key.replace(".to_out.", ".to_out.0.")] = t
        elif ".norm1.linear." in key or ".norm2.linear." in key:
            text, vision = t.chunk(2, dim=0)
            out[key] = torch.cat([vision, text], dim=0)
        elif key == "patch_embed.proj.weight" and config.patch_size_t is None:
            p = config.patch_size
            out[key] = t.reshape(t.shape[0], config.in_channels, p, p)
        else:
            out[key] = t
    return {k: v.detach().cpu().contiguous().clone() for k, v in out.items()}


def _write(directory: str, config: dict, state: Dict[str, torch.Tensor]) -> str:
    from safetensors.torch import save_file

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    # write-then-rename: a run killed mid-save leaves the previous files, never a truncated one
    tmp = os.path.join(directory, WEIGHTS_NAME + ".tmp")
    save_file(state, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(directory, WEIGHTS_NAME))
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return directory


def save_transformer(model, directory: str, dtype: torch.dtype | None = None, state_dict=None) -> str:
    """Write `model` (a CogVideoXTransformer, or a module wrapping one as `.module`, e.g. DDP) as a diffusers
    CogVideoXTransformer3DModel directory; dtype None keeps the parameters' dtype. state_dict: the full state to
    write instead of model.state_dict() (e.g. gathered from an FSDP-sharded model). Returns the directory."""
    from .transformer import CogVideoXTransformer

    model = getattr(model, "module", model)
    if not isinstance(model, CogVideoXTransformer):
        raise TypeError(f"model must be a CogVideoXTransformer, got {type(model).__name__}")
    state = model.state_dict() if state_dict is None else state_dict
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return _write(directory, transformer_config_to_diffusers(model.config),
                  transformer_state_to_diffusers(state, model.config))


def save_vae(vae, directory: str) -> str:
    """Write a CogVideoXVAE as a diffusers AutoencoderKLCogVideoX directory (keys unchanged)."""
    from .config import _VAE_DIFFUSERS_FIXED

    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(vae.config).items()}
    n = len(vae.config.block_out_channels)
    cfg.update(_class_name="AutoencoderKLCogVideoX", _diffusers_version=DIFFUSERS_VERSION, **_VAE_DIFFUSERS_FIXED,
               down_block_types=["CogVideoXDownBlock3D"] * n, up_block_types=["CogVideoXUpBlock3D"] * n)
    return _write(directory, cfg, {k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()})
