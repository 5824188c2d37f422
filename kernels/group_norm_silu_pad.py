"""GroupNorm (+ SpatialNorm modulation) + SiLU, written straight into the causally padded conv input.

This is the sequence before every causal conv of the CogVideoX VAE (diffusers' ResnetBlock3D: norm -> SiLU ->
CausalConv3d):
    h   = group_norm(x, num_groups, weight, bias, eps)     statistics over (C/G, T, H, W) of this chunk
    h   = h * zq_scale + zq_shift                          SpatialNorm3D: zq_scale = conv_y(zq), zq_shift = conv_b(zq)
    h   = silu(h)                                          (if silu)
    out, new_cache = causal_pad3d(h, kernel_t, cache, pad_hw, mode="first")

TRITON KERNELS: TO BE WRITTEN (helper). The reference below is the readable definition.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import check_like, check_shape, check_tensor
from .causal_pad3d import _check as _check_pad
from .causal_pad3d import causal_pad3d_ref


def group_norm_silu_pad_ref(x, num_groups, weight=None, bias=None, eps=1e-6, kernel_t=3, cache=None,
                            pad_hw=(1, 1), zq_scale=None, zq_shift=None, silu=True):
    h = F.group_norm(x.float(), num_groups, None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    if zq_scale is not None:
        h = h * zq_scale.float() + zq_shift.float()
    if silu:
        h = F.silu(h)
    return causal_pad3d_ref(h.to(x.dtype), kernel_t, cache, pad_hw, "first")


def group_norm_silu_pad(x, num_groups, weight=None, bias=None, eps=1e-6, kernel_t=3, cache=None, pad_hw=(1, 1),
                        zq_scale=None, zq_shift=None, silu=True):
    """x: (B, C, T, H, W); weight, bias: (C,); zq_scale, zq_shift: (B, C, T, H, W) or None
    -> (out (B, C, T+kernel_t-1, H+2ph, W+2pw), new_cache (B, C, kernel_t-1, H, W))."""
    _check_pad(x, kernel_t, cache, tuple(pad_hw), "first")
    C = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 or C % num_groups:
        raise ValueError(f"num_groups must be a positive int dividing C={C}, got {num_groups!r}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_tensor(name, p, ndim=1)
            check_like(name, p, "x", x, dtype=False)
            check_shape(name, p, (C,))
    if (zq_scale is None) != (zq_shift is None):
        raise ValueError("zq_scale and zq_shift must be given together")
    for name, p in (("zq_scale", zq_scale), ("zq_shift", zq_shift)):
        if p is not None:
            check_tensor(name, p, ndim=5)
            check_like(name, p, "x", x)
            check_shape(name, p, tuple(x.shape))
    return group_norm_silu_pad_ref(x, num_groups, weight, bias, eps, kernel_t, cache, tuple(pad_hw),
                                   zq_scale, zq_shift, silu)
