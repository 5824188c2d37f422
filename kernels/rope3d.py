"""q/k LayerNorm over the head dim, then 3D rotary position embedding on the vision tokens (CogVideoX 3D-RoPE).

x: (B, S, H, Dh) with S = text_len + T*Hg*Wg, or under context parallelism a shard: tokens [offset, offset + S)
of that joint sequence (text_len stays the global text length; global token g = offset + s is text when
g < text_len, else vision token n = g - text_len). Optional LayerNorm(Dh) on every token (text included), then for
vision token n at (t, y, x) (row-major) and channel pair (2k, 2k+1) of axis a in [t | h | w]:
    pos   = start[a] + index_a * step[a]          start, step: three floats, or fp32 (3,) tensors on x's device
    ang   = pos * theta ** (-2k / d_a)
    out[2k]   = x[2k] cos(ang) - x[2k+1] sin(ang)
    out[2k+1] = x[2k+1] cos(ang) + x[2k] sin(ang)
in fp32, rounded once to x.dtype (../shared/reference/diffusers-cogvideox.md §3). Text tokens are not rotated.

Fused: one read of x (any strides, e.g. the q slice of the (B, S, 3, H, Dh) QKV GEMM output) and one write of
out; cos/sin are computed in the kernel (no table in memory). A program owns BLOCK_S tokens and loops over the
batch and the heads, so its (BLOCK_S, Dh/2) cos/sin are computed once, before the loop, and reused for every
(batch, head) tile: the transcendental work shrinks with B*H and the kernel stays memory-bound.
start / step reach the kernels as two (3,) fp32 tensors (6 scalar loads per program), never as Python floats:
under torch.compile a float argument of a custom op is a constant the graph specializes on, and the CogVideoX 1.0
positions change with every resolution (fractional, from the resize-crop region). A tensor is a graph input.
Text tokens are selected, not multiplied by cos 1 / sin 0: a NaN or inf in channel 2k+1 of a text token must not
leak into channel 2k (NaN * 0 is NaN). The LayerNorm's mean and variance are taken of x - x[0] (each row's first
channel): an fp32 mean of raw values like 12345.678 is off by ~1e-3, which a constant row's rstd = 1/sqrt(eps)
would turn into outputs near 1 instead of torch's exact 0.
Backward: the rotation is orthogonal, so dz = R(-ang) dy; then LayerNorm backward (mean/rstd recomputed from x,
nothing but x is saved) and per-program partial sums of dweight/dbias, reduced on the host in a fixed order.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._dispatch import (check_eps, check_finite_float, check_grid, check_like, check_offset, check_params,
                        check_positive_float, check_shape, check_tensor, check_text_len, last_dim_contiguous,
                        local_text_len, use_triton)
from ._triton_common import cast_rtne


def default_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """CogVideoX's split of the head dim over (t, h, w): Dh/4, 3Dh/8, 3Dh/8 (16, 24, 24 for Dh = 64)."""
    return head_dim // 4, head_dim // 8 * 3, head_dim // 8 * 3


def rope3d_positions(start, step, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """start, step (three floats each, or (3,) tensors) -> two fp32 (3,) tensors on `device`.

    Tensors are only cast and moved where needed (a no-op for fp32 tensors already on `device`). Two float triples
    become one (2, 3) tensor and its two rows: eagerly one host-to-device copy, from pinned memory so that it is
    asynchronous (a copy from pageable memory synchronizes the stream); under torch.compile a product with a
    tensor instead, because Dynamo keeps a float that feeds tensor arithmetic a symbolic graph input, while a
    float inside torch.tensor([...]) becomes a constant it guards on (a recompilation for every new position).
    """
    device = torch.device(device) if device is not None else None
    triples = [v for v in (start, step) if not isinstance(v, torch.Tensor)]
    if triples:
        values = [f for v in triples for f in v]
        if torch.compiler.is_compiling():
            one = torch.ones((), dtype=torch.float32, device=device)
            rows = torch.stack([one * v for v in values])
        elif device is not None and device.type == "cuda":
            rows = torch.tensor(values, dtype=torch.float32).pin_memory().to(device, non_blocking=True)
        else:
            rows = torch.tensor(values, dtype=torch.float32, device=device)
        rows = iter(rows.view(len(triples), 3).unbind(0))
    return tuple(torch.as_tensor(v, dtype=torch.float32, device=device) if isinstance(v, torch.Tensor)
                 else next(rows) for v in (start, step))


def rope3d_table(grid, start=(0.0, 0.0, 0.0), step=(1.0, 1.0, 1.0), theta=10000.0, axes_dim=(16, 24, 24),
                 device=None):
    """cos, sin: (T*Hg*Wg, sum(axes_dim)) fp32, interleaved (channels 2k and 2k+1 share a frequency).

    start / step: three floats each or fp32 (3,) tensors; device None: start's device if it is a tensor, else CPU.
    """
    if device is None and isinstance(start, torch.Tensor):
        device = start.device
    start, step = rope3d_positions(start, step, device)
    angles = []
    for a, (n, d) in enumerate(zip(grid, axes_dim)):
        pos = start[a] + torch.arange(n, device=device, dtype=torch.float32) * step[a]       # fp32, as diffusers
        inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
        angles.append(torch.outer(pos, inv_freq).repeat_interleave(2, dim=1))
    T, Hg, Wg = grid
    at, ah, aw = angles
    ang = torch.cat([
        at[:, None, None].expand(T, Hg, Wg, -1),
        ah[None, :, None].expand(T, Hg, Wg, -1),
        aw[None, None, :].expand(T, Hg, Wg, -1),
    ], dim=-1).reshape(T * Hg * Wg, sum(axes_dim))                    # not -1: no vision tokens is (0, Dh)
    return ang.cos(), ang.sin()


def _shard_table(x_len, text_len, grid, start, step, theta, axes_dim, device, offset):
    """-> (text rows of the shard, cos, sin of its vision rows). offset None: x is the whole sequence."""
    cos, sin = rope3d_table(grid, start, step, theta, axes_dim, device=device)
    if offset is None:
        return text_len, cos, sin
    n_text = local_text_len(text_len, x_len, offset)
    n0 = max(offset - text_len, 0)                                   # vision index of the first vision row
    return n_text, cos[n0:n0 + x_len - n_text], sin[n0:n0 + x_len - n_text]


def rope3d_ref(x, text_len, grid, start=(0.0, 0.0, 0.0), step=(1.0, 1.0, 1.0), theta=10000.0, axes_dim=None,
               weight=None, bias=None, eps=1e-6, offset=None, segments=None):
    """Pure torch, fp32 inside, one rounding to x.dtype at the end. offset: as rope3d.
    segments: a kernels.Segments; x is the packed (1, N, H, Dh) sequence, each segment rotated with its own text
    length, grid and positions (text_len, grid, start, step are then unused)."""
    if segments is not None:
        return torch.cat([rope3d_ref(x[:, a:b], L, g, s0, s1, theta, axes_dim, weight, bias, eps)
                          for (a, b), L, g, s0, s1 in zip(segments.ranges(), segments.text_lens, segments.grids,
                                                          segments.start, segments.step)], dim=1)
    B, S, H, Dh = x.shape
    axes_dim = tuple(axes_dim) if axes_dim is not None else default_axes_dim(Dh)
    xf = x.float()
    if weight is not None or bias is not None:
        xf = F.layer_norm(xf, (Dh,), None if weight is None else weight.float(),
                          None if bias is None else bias.float(), eps)
    n_text, cos, sin = _shard_table(S, text_len, grid, start, step, theta, axes_dim, x.device, offset)
    vis = xf[:, n_text:]                                             # (B, N, H, Dh)
    rotated = torch.stack([-vis[..., 1::2], vis[..., 0::2]], dim=-1).flatten(-2)
    vis = vis * cos[None, :, None] + rotated * sin[None, :, None]
    return torch.cat([xf[:, :n_text], vis], dim=1).to(x.dtype)


@triton.jit
def _sincos(a):
    """sin(a), cos(a) in fp32, max abs error ~9e-8 for |a| < 2^13 (angles here are positions * inv_freq < ~100).

    Quadrant reduction r = a - q*pi/2 with pi/2 in three parts (Cody-Waite; q*part is exact), then the Cephes sinf /
    cosf polynomials on |r| <= pi/4. tl.sin/tl.cos lower to libdevice, whose huge-argument path costs a local-memory
    array and twice the instructions; here sin and cos share one reduction.
    """
    q = tl.floor(a * 0.6366197723675814 + 0.5)
    r = a - q * 1.5703125
    r = r - q * 4.837512969970703125e-4
    r = r - q * 7.549789954891882e-8
    z = r * r
    sr = r + r * z * (-1.6666654611e-1 + z * (8.3321608736e-3 + z * -1.9515295891e-4))
    cr = 1.0 - 0.5 * z + z * z * (4.166664568298827e-2 + z * (-1.388731625493765e-3 + z * 2.443315711809948e-5))
    quad = q.to(tl.int32) & 3                      # (sin, cos) of a = (s, c), (c, -s), (-s, -c), (-c, s)
    sin = tl.where((quad & 1) == 1, cr, sr)
    cos = tl.where((quad & 1) == 1, sr, cr)
    sin = tl.where(quad >= 2, -sin, sin)
    cos = tl.where((quad == 1) | (quad == 2), -cos, cos)
    return sin, cos


@triton.jit
def _rope3d_cos_sin(s, text_len, offset, Hg, Wg, START, STEP, log2_theta,
                    HEAD_DIM: tl.constexpr, DT: tl.constexpr, DH: tl.constexpr, BLOCK_D: tl.constexpr):
    """cos, sin (BLOCK_S, BLOCK_D/2) fp32 for local tokens s (global s + offset), and vision (BLOCK_S,): which of
    them are vision tokens (the caller passes text tokens through; their cos / sin are finite garbage).

    START, STEP: (3,) fp32 (t, h, w), read from memory (six scalar loads per program) so that positions are data,
    not compile-time constants, for torch.compile.
    """
    start_t, start_h, start_w = tl.load(START), tl.load(START + 1), tl.load(START + 2)
    step_t, step_h, step_w = tl.load(STEP), tl.load(STEP + 1), tl.load(STEP + 2)
    g = s + offset                                 # global token index (offset + S <= text_len + N < 2^31)
    # vision index n = f*Hg*Wg + y*Wg + x; clamped at 0 so text rows divide harmlessly
    n = tl.maximum(g - text_len, 0)
    f = n // (Hg * Wg)
    y = (n // Wg) % Hg
    x = n % Wg
    pos_t = start_t + f.to(tl.float32) * step_t
    pos_h = start_h + y.to(tl.float32) * step_h
    pos_w = start_w + x.to(tl.float32) * step_w
    # pair j -> (axis, k): [t: DT/2 pairs | h: DH/2 | w: the rest]
    j = tl.arange(0, BLOCK_D // 2)
    is_t = j < DT // 2
    is_h = (j >= DT // 2) & (j < (DT + DH) // 2)
    k = tl.where(is_t, j, tl.where(is_h, j - DT // 2, j - (DT + DH) // 2))
    d = tl.where(is_t, DT, tl.where(is_h, DH, HEAD_DIM - DT - DH)).to(tl.float32)
    # diffusers: inv_freq = 1 / theta ** (arange(0, d, 2) / d) in fp32; k = 0 is exactly 1 (theta ** 0), also
    # where -0 * log2_theta would be NaN (theta = inf, which rope3d rejects but the custom op may be handed)
    inv_freq = tl.where(k == 0, 1.0, tl.exp2(-((2 * k).to(tl.float32) / d) * log2_theta))
    pos = tl.where(is_t[None, :], pos_t[:, None], tl.where(is_h[None, :], pos_h[:, None], pos_w[:, None]))
    ang = pos * inv_freq[None, :]
    sin, cos = _sincos(ang)
    return cos, sin, g >= text_len


@triton.jit
def _first_channel(x, c):
    """x[:, :, 0] of a (BS, BH, BD) tile, the LayerNorm shift: a sum of zeros and one element (exact), reduced
    along the channel axis like the mean (a few lanes of one warp at Dh = 64, no shared memory)."""
    return tl.sum(tl.where(c[None, None, :] == 0, x, 0.0), axis=2)


@triton.jit
def _rope3d_fwd_kernel(X, W, Bias, OUT, B, S, H, sxb, sxs, sxh, text_len, offset, Hg, Wg, START, STEP, log2_theta,
                       eps,
                       HEAD_DIM: tl.constexpr, DT: tl.constexpr, DH: tl.constexpr, NORM: tl.constexpr,
                       HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                       BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    HALF: tl.constexpr = BLOCK_D // 2
    eps = tl.cast(eps, tl.float32)
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)                         # (BS,) token
    cos, sin, vision = _rope3d_cos_sin(s, text_len, offset, Hg, Wg, START, STEP, log2_theta, HEAD_DIM, DT, DH,
                                       BLOCK_D)
    cos = cos[:, None, :]                                                         # (BS, 1, HALF)
    sin = sin[:, None, :]
    vision = vision[:, None, None]                                                # (BS, 1, 1)
    c = tl.arange(0, BLOCK_D)
    c_ok = c < HEAD_DIM
    if HAS_W:
        w = tl.load(W + c, mask=c_ok, other=0.0).to(tl.float32)
    if HAS_B:
        bb = tl.load(Bias + c, mask=c_ok, other=0.0).to(tl.float32)
    s64 = s.to(tl.int64)[:, None, None]                                           # 64-bit row offsets
    sc_ok = (s < S)[:, None, None] & c_ok[None, None, :]
    for b in range(B):
        for h0 in range(0, H, BLOCK_H):
            h = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)[None, :, None]
            mask = sc_ok & (h < H)                                                # (BS, BH, BD)
            x_off = tl.cast(b, tl.int64) * sxb + s64 * sxs + h * sxh + c[None, None, :]
            x = tl.load(X + x_off, mask=mask, other=0.0).to(tl.float32)
            if NORM:
                xs = tl.where(mask, x - _first_channel(x, c)[:, :, None], 0.0)
                xc = tl.where(mask, xs - (tl.sum(xs, axis=2) / HEAD_DIM)[:, :, None], 0.0)
                rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=2) / HEAD_DIM + eps)
                x = xc * rstd[:, :, None]
                if HAS_W:
                    x = x * w[None, None, :]
                if HAS_B:
                    x = x + bb[None, None, :]
            xe, xo = tl.split(tl.reshape(x, (BLOCK_S, BLOCK_H, HALF, 2)))         # pairs (2k, 2k+1)
            y = tl.reshape(tl.join(xe * cos - xo * sin, xo * cos + xe * sin), (BLOCK_S, BLOCK_H, BLOCK_D))
            y = tl.where(vision, y, x)
            out_off = ((tl.cast(b, tl.int64) * S + s64) * H + h) * HEAD_DIM + c[None, None, :]
            tl.store(OUT + out_off, cast_rtne(y, OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rope3d_bwd_kernel(DY, X, W, DX, DW_PART, DB_PART, B, S, H, sxb, sxs, sxh, text_len, offset, Hg, Wg, START,
                       STEP, log2_theta, eps,
                       HEAD_DIM: tl.constexpr, DT: tl.constexpr, DH: tl.constexpr, NORM: tl.constexpr,
                       HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                       BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    HALF: tl.constexpr = BLOCK_D // 2
    eps = tl.cast(eps, tl.float32)
    pid = tl.program_id(0)
    s = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    cos, sin, vision = _rope3d_cos_sin(s, text_len, offset, Hg, Wg, START, STEP, log2_theta, HEAD_DIM, DT, DH,
                                       BLOCK_D)
    cos = cos[:, None, :]
    sin = sin[:, None, :]
    vision = vision[:, None, None]
    c = tl.arange(0, BLOCK_D)
    c_ok = c < HEAD_DIM
    if HAS_W:
        w = tl.load(W + c, mask=c_ok, other=0.0).to(tl.float32)
    s64 = s.to(tl.int64)[:, None, None]
    sc_ok = (s < S)[:, None, None] & c_ok[None, None, :]
    # accumulated over tokens in the loop (axis 0 is per-thread in the usual layout: no shuffles), heads at the end
    dw_acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    for b in range(B):
        for h0 in range(0, H, BLOCK_H):
            h = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)[None, :, None]
            mask = sc_ok & (h < H)
            row_off = ((tl.cast(b, tl.int64) * S + s64) * H + h) * HEAD_DIM + c[None, None, :]   # dy, dx: contiguous
            dy = tl.load(DY + row_off, mask=mask, other=0.0).to(tl.float32)
            # rotate back by -ang: R(ang)^T dy
            de, do = tl.split(tl.reshape(dy, (BLOCK_S, BLOCK_H, HALF, 2)))
            dz = tl.reshape(tl.join(de * cos + do * sin, do * cos - de * sin), (BLOCK_S, BLOCK_H, BLOCK_D))
            dz = tl.where(vision, dz, dy)
            if NORM:
                x_off = tl.cast(b, tl.int64) * sxb + s64 * sxs + h * sxh + c[None, None, :]
                x = tl.load(X + x_off, mask=mask, other=0.0).to(tl.float32)
                xs = tl.where(mask, x - _first_channel(x, c)[:, :, None], 0.0)
                xc = tl.where(mask, xs - (tl.sum(xs, axis=2) / HEAD_DIM)[:, :, None], 0.0)
                rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=2) / HEAD_DIM + eps)
                xhat = xc * rstd[:, :, None]
                if HAS_W:
                    dw_acc += tl.sum(dz * xhat, axis=0)
                    dxhat = dz * w[None, None, :]
                else:
                    dxhat = dz
                if HAS_B:
                    db_acc += tl.sum(dz, axis=0)
                c1 = tl.sum(xhat * dxhat, axis=2) / HEAD_DIM
                c2 = tl.sum(dxhat, axis=2) / HEAD_DIM
                dz = (dxhat - xhat * c1[:, :, None] - c2[:, :, None]) * rstd[:, :, None]
            tl.store(DX + row_off, cast_rtne(dz, DX.dtype.element_ty), mask=mask)
    # one partial row per program, summed on the host in a fixed order (deterministic, no atomics)
    if HAS_W:
        tl.store(DW_PART + pid.to(tl.int64) * HEAD_DIM + c, tl.sum(dw_acc, axis=0), mask=c_ok)
    if HAS_B:
        tl.store(DB_PART + pid.to(tl.int64) * HEAD_DIM + c, tl.sum(db_acc, axis=0), mask=c_ok)


def rope3d_config(H: int, head_dim: int, backward: bool = False) -> dict:
    """Block sizes and warps: each loop step handles a (BLOCK_S tokens, BLOCK_H heads, BLOCK_D channels) tile.

    Tiles of 4096 elements forward, 2048 backward (it holds x, dy and the LayerNorm terms at once): at CogVideoX
    shapes (Dh = 64, H = 30 or 48, bf16) that is 96 / 96 registers per thread and no spills (AOT sm_90 build, tests).
    30 heads pad to 32 (2 masked heads cost compute, not memory traffic). Programs: S / BLOCK_S = 4444 forward and
    8888 backward at S = 17,776, plenty for 132 SMs.
    """
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(H), 16)
    block_s = max(1, (2048 if backward else 4096) // (block_h * block_d))
    return {"BLOCK_S": block_s, "BLOCK_H": block_h, "BLOCK_D": block_d, "num_warps": 4}


def _launch_args(x, text_len, grid, start, step, theta, axes_dim, eps, offset):
    B, S, H, Dh = x.shape
    T, Hg, Wg = grid
    # Hg, Wg >= 1 keeps the kernel's integer divisions defined when there are no vision tokens; start / step are
    # read with unit stride
    return ([B, S, H, x.stride(0), x.stride(1), x.stride(2), text_len, offset, max(Hg, 1), max(Wg, 1),
             start.float().contiguous(), step.float().contiguous(), math.log2(theta), float(eps)],
            {"HEAD_DIM": Dh, "DT": axes_dim[0], "DH": axes_dim[1]})


def rope3d_fwd(x, text_len, grid, start, step, theta, axes_dim, weight, bias, eps, offset=0):
    """Launch the forward kernel. x: (B, S, H, Dh), last stride 1; start, step (3,) fp32 tensors on x's device
    -> out (B, S, H, Dh) contiguous."""
    x = last_dim_contiguous(x)
    B, S, H, Dh = x.shape
    out = torch.empty((B, S, H, Dh), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    cfg = rope3d_config(H, Dh)
    args, meta = _launch_args(x, text_len, grid, start, step, theta, axes_dim, eps, offset)
    w = last_dim_contiguous(weight) if weight is not None else x
    bb = last_dim_contiguous(bias) if bias is not None else x
    norm = int(weight is not None or bias is not None)
    _rope3d_fwd_kernel[check_grid((triton.cdiv(S, cfg["BLOCK_S"]),))](
        x, w, bb, out, *args, **meta, NORM=norm, HAS_W=int(weight is not None), HAS_B=int(bias is not None),
        BLOCK_S=cfg["BLOCK_S"], BLOCK_H=cfg["BLOCK_H"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"])
    return out


def rope3d_bwd(dy, x, text_len, grid, start, step, theta, axes_dim, weight, bias, eps, offset=0):
    """Launch the backward kernel -> dx (like dy), dweight, dbias (None when weight / bias is None).

    x is only read when there is a LayerNorm (the rotation alone is linear); pass None otherwise.
    """
    dy = dy.contiguous()
    B, S, H, Dh = dy.shape
    norm = weight is not None or bias is not None
    x = last_dim_contiguous(x) if norm else dy
    dx = torch.empty_like(dy)
    cfg = rope3d_config(H, Dh, backward=True)
    n_prog = triton.cdiv(S, cfg["BLOCK_S"])
    dw_part = torch.empty((n_prog if weight is not None else 0, Dh), device=dy.device, dtype=torch.float32)
    db_part = torch.empty((n_prog if bias is not None else 0, Dh), device=dy.device, dtype=torch.float32)
    if dy.numel() > 0:
        args, meta = _launch_args(x, text_len, grid, start, step, theta, axes_dim, eps, offset)
        w = last_dim_contiguous(weight) if weight is not None else dy
        _rope3d_bwd_kernel[check_grid((n_prog,))](
            dy, x, w, dx, dw_part, db_part, *args, **meta, NORM=int(norm), HAS_W=int(weight is not None),
            HAS_B=int(bias is not None), BLOCK_S=cfg["BLOCK_S"], BLOCK_H=cfg["BLOCK_H"], BLOCK_D=cfg["BLOCK_D"],
            num_warps=cfg["num_warps"])
    dweight = dw_part.sum(0).to(weight.dtype) if weight is not None else None
    dbias = db_part.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias


def _rope3d_bwd_ref(dy, x, text_len, grid, start, step, theta, axes_dim, weight, bias, eps, offset=0):
    """Pure-torch backward in fp32 (explicit: autograd is off inside a custom op's implementation).

    x is only needed for the LayerNorm; pass None without one.
    """
    dyf = dy.float()
    n_text, cos, sin = _shard_table(dy.shape[1], text_len, grid, start, step, theta, axes_dim, dy.device, offset)
    vis = dyf[:, n_text:]                                            # (B, N, H, Dh)
    rotated = torch.stack([vis[..., 1::2], -vis[..., 0::2]], dim=-1).flatten(-2)      # R(ang)^T = R(-ang)
    dz = torch.cat([dyf[:, :n_text], vis * cos[None, :, None] + rotated * sin[None, :, None]], dim=1)
    if weight is None and bias is None:
        return dz.to(dy.dtype), None, None
    xs = x.float() - x[..., :1].float()                              # shifted by channel 0, as the kernels
    xc = xs - xs.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    xhat = xc * rstd
    dxhat = dz if weight is None else dz * weight.float()
    dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    dw = None if weight is None else (dz * xhat).sum((0, 1, 2)).to(weight.dtype)
    db = None if bias is None else dz.sum((0, 1, 2)).to(bias.dtype)
    return dx.to(dy.dtype), dw, db


@torch.library.custom_op("cogvideox::rope3d", mutates_args=())
def _rope3d_op(x: torch.Tensor, text_len: int, grid: Sequence[int], start: torch.Tensor, step: torch.Tensor,
               theta: float, axes_dim: Sequence[int], weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float, offset: int = 0) -> torch.Tensor:
    if use_triton(x):
        return rope3d_fwd(x, text_len, grid, start, step, theta, axes_dim, weight, bias, eps, offset)
    return rope3d_ref(x, text_len, grid, start, step, theta, axes_dim, weight, bias, eps, offset).contiguous()


@_rope3d_op.register_fake
def _(x, text_len, grid, start, step, theta, axes_dim, weight, bias, eps, offset=0):
    return x.new_empty(x.shape)


@torch.library.custom_op("cogvideox::rope3d_bwd", mutates_args=())
def _rope3d_bwd_op(dy: torch.Tensor, x: Optional[torch.Tensor], text_len: int, grid: Sequence[int],
                   start: torch.Tensor, step: torch.Tensor, theta: float, axes_dim: Sequence[int],
                   weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   eps: float, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # a custom op cannot return None: absent dweight / dbias come back as empty tensors
    if use_triton(dy):
        dx, dw, db = rope3d_bwd(dy, x, text_len, grid, start, step, theta, axes_dim, weight, bias, eps, offset)
    else:
        dx, dw, db = _rope3d_bwd_ref(dy.contiguous(), x, text_len, grid, start, step, theta, axes_dim, weight,
                                     bias, eps, offset)
    return dx, dy.new_empty(0) if dw is None else dw, dy.new_empty(0) if db is None else db


@_rope3d_bwd_op.register_fake
def _(dy, x, text_len, grid, start, step, theta, axes_dim, weight, bias, eps, offset=0):
    return (dy.new_empty(dy.shape), dy.new_empty(0) if weight is None else weight.new_empty(weight.shape),
            dy.new_empty(0) if bias is None else bias.new_empty(bias.shape))


def _setup_context(ctx, inputs, output):
    x, text_len, grid, start, step, theta, axes_dim, weight, bias, eps, offset = inputs
    norm = weight is not None or bias is not None
    ctx.save_for_backward(x if norm else None, weight, bias, start, step)   # without a norm, no activation
    ctx.args = (text_len, grid, theta, axes_dim)
    ctx.eps, ctx.offset = eps, offset


def _backward(ctx, dy):
    x, weight, bias, start, step = ctx.saved_tensors
    text_len, grid, theta, axes_dim = ctx.args
    dx, dw, db = _rope3d_bwd_op(dy.contiguous(), x, text_len, grid, start, step, theta, axes_dim, weight, bias,
                                ctx.eps, ctx.offset)
    return (dx, None, None, None, None, None, None, dw if weight is not None else None,
            db if bias is not None else None, None, None)


_rope3d_op.register_autograd(_backward, setup_context=_setup_context)


def _check(x, text_len, grid, axes_dim, weight, bias, offset):
    check_tensor("x", x, ndim=4)
    B, S, H, Dh = x.shape
    check_text_len(text_len, S if offset is None else None)
    if len(grid) != 3 or any((not isinstance(g, int)) or g < 0 for g in grid):
        raise ValueError(f"grid must be three non-negative ints (T, Hg, Wg), got {grid}")
    n_vis = grid[0] * grid[1] * grid[2]
    if offset is None and text_len + n_vis != S:
        raise ValueError(f"grid {tuple(grid)} holds {n_vis} vision tokens but S - text_len = {S - text_len}")
    if offset is not None and check_offset(offset) + S > text_len + n_vis:
        raise ValueError(f"offset + S = {offset} + {S} exceeds the joint sequence: text_len + T*Hg*Wg = "
                         f"{text_len} + {n_vis}")
    axes_dim = tuple(axes_dim) if axes_dim is not None else default_axes_dim(Dh)
    if len(axes_dim) != 3 or any(d <= 0 or d % 2 for d in axes_dim):
        raise ValueError(f"axes_dim must be three positive even ints, got {axes_dim}")
    if sum(axes_dim) != Dh:
        raise ValueError(f"axes_dim {axes_dim} must sum to the head dim {Dh}")
    check_params(x, Dh, weight=weight, bias=bias)
    return axes_dim


def _check_positions(x, start, step):
    """start / step: three floats, or fp32 (3,) tensors on x's device -> two fp32 (3,) tensors on x's device."""
    for name, v in (("start", start), ("step", step)):
        if isinstance(v, torch.Tensor):
            check_tensor(name, v, ndim=1, dtypes=(torch.float32,))
            check_like(name, v, "x", x, dtype=False)
            check_shape(name, v, (3,))
        else:
            if not isinstance(v, (tuple, list)):
                raise TypeError(f"{name} must be three floats (t, h, w) or an fp32 (3,) tensor, got "
                                f"{type(v).__name__}")
            if len(v) != 3:
                raise ValueError(f"{name} must hold three floats (t, h, w), got {v}")
            for axis, f in zip("thw", v):
                check_finite_float(f"{name}[{axis}]", f)
    return rope3d_positions(start, step, x.device)


def rope3d(x, text_len, grid, start=(0.0, 0.0, 0.0), step=(1.0, 1.0, 1.0), theta=10000.0, axes_dim=None,
           weight=None, bias=None, eps=1e-6, offset=None):
    """x: (B, S, H, Dh) q or k (any strides, last one 1); grid (T, Hg, Wg) of the vision tokens -> out (B, S, H, Dh).

    start / step: per-axis (t, h, w) positions start + index * step (fractional at non-native resolutions), each
    three floats or an fp32 (3,) tensor on x's device. Either way torch.compile treats them as data (one graph
    for every resolution). Floats cost one small asynchronous host-to-device copy per call; a model that calls
    rope3d in every layer builds the tensors once per forward instead (cogvideox.transformer does).
    weight / bias: (Dh,) LayerNorm affine shared by all heads; LayerNorm runs on every token when either is given.
    offset: None, x is the whole sequence (S = text_len + T*Hg*Wg); an int, x is the context-parallel shard
    [offset, offset + S) of it (offset + S <= text_len + T*Hg*Wg), text_len still the global text length.
    """
    axes_dim = _check(x, text_len, grid, axes_dim, weight, bias, offset)
    start, step = _check_positions(x, start, step)
    theta = check_positive_float("theta", theta)   # finite and > 0 (theta = inf used to give NaN)
    return _rope3d_op(x, text_len, list(grid), start, step, theta, list(axes_dim), weight, bias, check_eps(eps),
                      0 if offset is None else offset)


# kernels/__init__ binds `kernels.rope3d` to the function above, hiding this module from attribute access: the
# helpers the README documents as kernels.rope3d.<name> are reachable from the function too.
rope3d.rope3d_positions = rope3d_positions
rope3d.rope3d_config = rope3d_config
rope3d.rope3d_table = rope3d_table
rope3d.default_axes_dim = default_axes_dim
