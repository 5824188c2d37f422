"""A lean CogVideoX (arXiv 2408.06072) on the fused kernels of `kernels`: the expert transformer, the 3D causal
VAE, v-prediction zero-SNR samplers and the text/image-to-video pipeline, loading diffusers-format checkpoints."""
# `attention` (the function) stays in cogvideox.attention: exporting it here would shadow the submodule.
from .attention import BACKENDS, AttentionBackendError, available_backends
from .config import TRANSFORMER_PRESETS, VAE_PRESETS, TransformerConfig, VAEConfig
from .diffusers_ops import apply_to_diffusers, remove_from_diffusers
from .pipeline import denoise, encode_prompt, generate
from .transformer import CogVideoXTransformer, compile_blocks
from .vae import CogVideoXVAE, DiagonalGaussian, Tiling, load_vae
from .weights import CheckpointError, load_transformer

__all__ = [
    "BACKENDS", "AttentionBackendError", "available_backends",
    "TRANSFORMER_PRESETS", "VAE_PRESETS", "TransformerConfig", "VAEConfig",
    "apply_to_diffusers", "remove_from_diffusers",
    "denoise", "encode_prompt", "generate",
    "CogVideoXTransformer", "compile_blocks",
    "CogVideoXVAE", "DiagonalGaussian", "Tiling", "load_vae",
    "CheckpointError", "load_transformer",
]
