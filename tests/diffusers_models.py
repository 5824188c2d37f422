"""Tiny diffusers models with random weights, saved with save_pretrained: the oracles of the parity tests.

Reusable by any test (transformer, pipeline, VAE):
- `randomize_(module, seed)`: every parameter and persistent buffer gets fresh random values, so zero-initialised
  weights (LayerNorm biases, learned tables) and unit ones (LayerNorm weights) cannot hide a bug.
- `save_pretrained(model, directory)`: write a diffusers model directory (config.json + safetensors).
- `tiny_transformer_kwargs(family, **overrides)` and `tiny_diffusers_transformer(family, seed)`: a
  CogVideoXTransformer3DModel of one family ("2b", "5b", "5b-i2v", "1.5", "1.5-i2v") at a size that runs in
  milliseconds on CPU.
- `diffusers_rotary_emb(model, latent_shape)`: the (cos, sin) that diffusers' pipelines pass the transformer
  (`_prepare_rotary_positional_embeddings`), or None for models without RoPE.
diffusers is imported lazily here: it is a test-only dependency, never imported by the package.
"""
from __future__ import annotations

import os

import torch

# Tiny shapes shared by every family: 2 heads x 16 (D = 32), 2 layers, 4 latent channels, 5 text tokens of
# width 24, training grid 8 x 12 latents and 9 frames (3 latent frames).
TINY_TRANSFORMER = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, in_channels=4, out_channels=4,
                        time_embed_dim=24, text_embed_dim=24, max_text_seq_length=5, sample_height=8,
                        sample_width=12, sample_frames=9)

# What differs per family (reference §1 table), on top of TINY_TRANSFORMER.
TRANSFORMER_FAMILIES = {
    "2b": {},
    "5b": {"use_rotary_positional_embeddings": True},
    "5b-i2v": {"use_rotary_positional_embeddings": True, "use_learned_positional_embeddings": True,
               "in_channels": 8},
    "1.5": {"use_rotary_positional_embeddings": True, "patch_size_t": 2, "patch_bias": False},
    "1.5-i2v": {"use_rotary_positional_embeddings": True, "patch_size_t": 2, "patch_bias": False,
                "in_channels": 8, "ofs_embed_dim": 24},
}


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.5) -> torch.nn.Module:
    """In place: t += std * randn * (rms of t, or 1 where t is all zero) for every float tensor of the state dict
    (parameters and persistent buffers; non-persistent buffers are caches the model recomputes, left alone).

    Keeps each tensor's scale (so activations stay in a sane range) while making every element distinct.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in module.state_dict(keep_vars=True).values():
            if not t.is_floating_point():
                continue
            rms = t.float().pow(2).mean().sqrt().item() if t.numel() else 0.0
            noise = torch.randn(t.shape, generator=g) * std * (rms if rms > 0 else 1.0)
            t.add_(noise.to(t.dtype))
    return module


def save_pretrained(model, directory: str) -> str:
    """diffusers save_pretrained (config.json + safetensors) into `directory`; returns it as a str."""
    directory = str(directory)
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def tiny_transformer_kwargs(family: str, **overrides) -> dict:
    if family not in TRANSFORMER_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {sorted(TRANSFORMER_FAMILIES)}")
    return {**TINY_TRANSFORMER, **TRANSFORMER_FAMILIES[family], **overrides}


def tiny_diffusers_transformer(family: str, seed: int = 0, **overrides):
    """A randomized diffusers CogVideoXTransformer3DModel (fp32, eval mode) of the given family."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(**tiny_transformer_kwargs(family, **overrides))
    return randomize_(model, seed).eval()


def diffusers_rotary_emb(model, latent_shape, device=None):
    """(cos, sin) as diffusers' CogVideoX pipelines build them for latents of shape (B, F, C, H, W); None
    when the model has no RoPE. Calls the pipeline's own method, so the pipeline stays the oracle."""
    if not model.config.use_rotary_positional_embeddings:
        return None
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline

    _, frames, _, h, w = latent_shape
    vae_scale = 8                               # the pipelines' vae_scale_factor_spatial (3 spatial resamplings)
    stub = CogVideoXPipeline.__new__(CogVideoXPipeline)   # only the two attributes the method reads
    stub.__dict__.update(transformer=model, vae_scale_factor_spatial=vae_scale)
    return stub._prepare_rotary_positional_embeddings(h * vae_scale, w * vae_scale, frames, device or "cpu")
