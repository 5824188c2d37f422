"""Fused Triton kernels for CogVideoX, each with a pure-torch reference `<op>_ref`, forward and backward.

On CUDA tensors the public ops run the Triton kernels; on CPU the reference, unless COGVIDEOX_KERNELS=triton
and TRITON_INTERPRET=1 are set (see kernels/_dispatch.py).
"""
from .causal_pad3d import causal_pad3d, causal_pad3d_ref
from .expert_adaln import expert_adaln, expert_adaln_ref, expert_adaln_residual, expert_adaln_residual_ref
from .group_norm_silu_pad import group_norm_silu_pad, group_norm_silu_pad_ref
from .rope3d import rope3d, rope3d_ref
from .segments import Segments

__all__ = [
    "causal_pad3d", "causal_pad3d_ref",
    "expert_adaln", "expert_adaln_ref", "expert_adaln_residual", "expert_adaln_residual_ref",
    "group_norm_silu_pad", "group_norm_silu_pad_ref",
    "rope3d", "rope3d_ref",
    "Segments",
]
