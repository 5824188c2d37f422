"""Causal 3D-conv padding: the frames in front of a temporally causal conv, plus zero spatial padding.

x: (B, C, T, H, W) -> out (B, C, T + kernel_t - 1, H + 2 pad_h, W + 2 pad_w), new_cache (B, C, kernel_t - 1, H, W).
The kernel_t - 1 frames in front are `cache` when given (a later chunk of a chunked causal conv), else copies of
frame 0 (mode "first", CogVideoX's CausalConv3d) or zeros (mode "zeros"). Mode "replicate" replicates edges in
all three dimensions (F.pad replicate) and takes no cache. new_cache is the last kernel_t - 1 frames of the
temporally padded input, without spatial padding: what the next chunk needs.

TRITON KERNELS: TO BE WRITTEN (helper). The reference below is the readable definition.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import check_like, check_shape, check_tensor

MODES = ("first", "zeros", "replicate")


def causal_pad3d_ref(x, kernel_t, cache=None, pad_hw=(0, 0), mode="first"):
    B, C, T, H, W = x.shape
    kt = kernel_t - 1
    ph, pw = pad_hw
    if mode == "replicate":
        padded_t = F.pad(x, (0, 0, 0, 0, kt, 0), mode="replicate") if kt else x
        out = F.pad(padded_t, (pw, pw, ph, ph, 0, 0), mode="replicate") if (ph or pw) else padded_t.clone()
    else:
        if cache is not None:
            front = cache
        elif mode == "first":
            front = x[:, :, :1].expand(B, C, kt, H, W)
        else:
            front = x.new_zeros(B, C, kt, H, W)
        padded_t = torch.cat([front, x], dim=2)
        out = F.pad(padded_t, (pw, pw, ph, ph))
    return out, padded_t[:, :, padded_t.shape[2] - kt:].clone()


def _check(x, kernel_t, cache, pad_hw, mode):
    check_tensor("x", x, ndim=5)
    if isinstance(kernel_t, bool) or not isinstance(kernel_t, int) or kernel_t < 1:
        raise ValueError(f"kernel_t must be an int >= 1, got {kernel_t!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if len(pad_hw) != 2 or any((not isinstance(p, int)) or p < 0 for p in pad_hw):
        raise ValueError(f"pad_hw must be two non-negative ints, got {pad_hw!r}")
    if cache is not None:
        if mode == "replicate":
            raise ValueError("mode='replicate' takes no cache")
        check_tensor("cache", cache, ndim=5)
        check_like("cache", cache, "x", x)
        B, C, T, H, W = x.shape
        check_shape("cache", cache, (B, C, kernel_t - 1, H, W))


def causal_pad3d(x, kernel_t, cache=None, pad_hw=(0, 0), mode="first"):
    """x: (B, C, T, H, W) -> (out (B, C, T+kernel_t-1, H+2ph, W+2pw), new_cache (B, C, kernel_t-1, H, W))."""
    _check(x, kernel_t, cache, tuple(pad_hw), mode)
    return causal_pad3d_ref(x, kernel_t, cache, tuple(pad_hw), mode)
