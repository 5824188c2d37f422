"""q/k LayerNorm over the head dim, then 3D rotary position embedding on the vision tokens (CogVideoX 3D-RoPE).

x: (B, S, H, Dh) with S = text_len + T*Hg*Wg. Optional LayerNorm(Dh) on every token (text included), then for
vision token n at (t, y, x) (row-major) and channel pair (2k, 2k+1) of axis a in [t | h | w]:
    pos   = start[a] + index_a * step[a]
    ang   = pos * theta ** (-2k / d_a)
    out[2k]   = x[2k] cos(ang) - x[2k+1] sin(ang)
    out[2k+1] = x[2k+1] cos(ang) + x[2k] sin(ang)
in fp32, rounded once to x.dtype (../shared/reference/diffusers-cogvideox.md §3). Text tokens are not rotated.

TRITON KERNELS: TO BE WRITTEN (helper). The reference below is the readable definition.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import check_like, check_shape, check_tensor, check_text_len


def default_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """CogVideoX's split of the head dim over (t, h, w): Dh/4, 3Dh/8, 3Dh/8 (16, 24, 24 for Dh = 64)."""
    return head_dim // 4, head_dim // 8 * 3, head_dim // 8 * 3


def rope3d_table(grid, start=(0.0, 0.0, 0.0), step=(1.0, 1.0, 1.0), theta=10000.0, axes_dim=(16, 24, 24),
                 device=None):
    """cos, sin: (T*Hg*Wg, sum(axes_dim)) fp32, interleaved (channels 2k and 2k+1 share a frequency)."""
    angles = []
    for n, s0, ds, d in zip(grid, start, step, axes_dim):
        pos = s0 + torch.arange(n, device=device, dtype=torch.float32) * ds
        inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
        angles.append(torch.outer(pos, inv_freq).repeat_interleave(2, dim=1))
    T, Hg, Wg = grid
    at, ah, aw = angles
    ang = torch.cat([
        at[:, None, None].expand(T, Hg, Wg, -1),
        ah[None, :, None].expand(T, Hg, Wg, -1),
        aw[None, None, :].expand(T, Hg, Wg, -1),
    ], dim=-1).reshape(T * Hg * Wg, -1)
    return ang.cos(), ang.sin()


def rope3d_ref(x, text_len, grid, start=(0.0, 0.0, 0.0), step=(1.0, 1.0, 1.0), theta=10000.0, axes_dim=None,
               weight=None, bias=None, eps=1e-6):
    """Pure torch, fp32 inside, one rounding to x.dtype at the end."""
    B, S, H, Dh = x.shape
    axes_dim = tuple(axes_dim) if axes_dim is not None else default_axes_dim(Dh)
    xf = x.float()
    if weight is not None or bias is not None:
        xf = F.layer_norm(xf, (Dh,), None if weight is None else weight.float(),
                          None if bias is None else bias.float(), eps)
    cos, sin = rope3d_table(grid, start, step, theta, axes_dim, device=x.device)
    vis = xf[:, text_len:]                                           # (B, N, H, Dh)
    rotated = torch.stack([-vis[..., 1::2], vis[..., 0::2]], dim=-1).flatten(-2)
    vis = vis * cos[None, :, None] + rotated * sin[None, :, None]
    return torch.cat([xf[:, :text_len], vis], dim=1).to(x.dtype)


def _check(x, text_len, grid, axes_dim, weight, bias):
    check_tensor("x", x, ndim=4)
    B, S, H, Dh = x.shape
    check_text_len(text_len, S)
    if len(grid) != 3 or any((not isinstance(g, int)) or g < 0 for g in grid):
        raise ValueError(f"grid must be three non-negative ints (T, Hg, Wg), got {grid}")
    if text_len + grid[0] * grid[1] * grid[2] != S:
        raise ValueError(f"grid {tuple(grid)} holds {grid[0] * grid[1] * grid[2]} vision tokens but "
                         f"S - text_len = {S - text_len}")
    axes_dim = tuple(axes_dim) if axes_dim is not None else default_axes_dim(Dh)
    if len(axes_dim) != 3 or any(d <= 0 or d % 2 for d in axes_dim):
        raise ValueError(f"axes_dim must be three positive even ints, got {axes_dim}")
    if sum(axes_dim) != Dh:
        raise ValueError(f"axes_dim {axes_dim} must sum to the head dim {Dh}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_tensor(name, p, ndim=1)
            check_like(name, p, "x", x, dtype=False)
            check_shape(name, p, (Dh,))
    return axes_dim


def rope3d(x, text_len, grid, start=(0.0, 0.0, 0.0), step=(1.0, 1.0, 1.0), theta=10000.0, axes_dim=None,
           weight=None, bias=None, eps=1e-6):
    """x: (B, S, H, Dh) q or k; grid (T, Hg, Wg) of the vision tokens -> out (B, S, H, Dh)."""
    axes_dim = _check(x, text_len, grid, axes_dim, weight, bias)
    return rope3d_ref(x, text_len, grid, start, step, theta, axes_dim, weight, bias, eps)
