"""A lean CogVideoX (arXiv 2408.06072) on the fused kernels of `kernels`: the expert transformer, the 3D causal
VAE, v-prediction zero-SNR samplers and the text/image-to-video pipeline, loading diffusers-format checkpoints."""
# The names below are imported on first use (PEP 562), so that `python -m cogvideox --help` does not import torch.
# `attention` (the function) stays in cogvideox.attention: exporting it here would shadow the submodule.
import importlib

_EXPORTS = {
    "attention": ("BACKENDS", "AttentionBackendError", "available_backends"),
    "config": ("TRANSFORMER_PRESETS", "VAE_PRESETS", "TransformerConfig", "VAEConfig"),
    "diffusers_ops": ("apply_to_diffusers", "remove_from_diffusers"),
    "pipeline": ("denoise", "encode_prompt", "generate"),
    "transformer": ("CogVideoXTransformer", "compile_blocks"),
    "vae": ("CogVideoXVAE", "DiagonalGaussian", "Tiling", "load_vae"),
    "weights": ("CheckpointError", "load_transformer"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = list(_MODULE_OF)


def __getattr__(name):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
