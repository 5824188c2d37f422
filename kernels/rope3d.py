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

q and k in one launch: weight / bias may be (G, Dh), head h taking row h // (H // G). The model hands over the q and
k slices of the fused QKV output as one strided (B, S, 2H, Dh) view (qkv.unflatten(-1, (3, H, Dh))[:, :, :2]
.flatten(2, 3): the (2, H) dims merge) with weight torch.stack([norm_q.weight, norm_k.weight]). The group is a
launch axis (a program owns one row's H // G heads), so a program's loops are those of G = 1; dweight is (G, Dh).
Packed sequences (segments=, kernels.Segments): x is (1, N, H, Dh), several [text_i | vision_i] end to end. The
grid is (token blocks of the longest segment, segments[, G]); a program owns BLOCK_S tokens of ONE segment and
reads its row base, length, text length, Hg, Wg and start / step rows from the layout tables, so each token sees
the arithmetic of its segment run alone (VARLEN is a constexpr: the dense build is unchanged). Blocks past a short
segment's end skip the head loop and write zero partials.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._dispatch import (check_eps, check_finite_float, check_grid, check_like, check_offset, check_positive_float,
                        check_shape, check_tensor, check_text_len, last_dim_contiguous, local_text_len, use_triton)
from ._triton_common import cast_rtne
from .segments import Segments, check_segments


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
    """Pure torch, fp32 inside, one rounding to x.dtype at the end. offset, weight / bias ((Dh,) or (G, Dh)): as
    rope3d. segments: a kernels.Segments; x is the packed (1, N, H, Dh) sequence, each segment rotated with its own
    text length, grid and positions (text_len, grid, start, step are then unused)."""
    if segments is not None:
        return torch.cat([rope3d_ref(x[:, a:b], L, g, s0, s1, theta, axes_dim, weight, bias, eps)
                          for (a, b), L, g, s0, s1 in zip(segments.ranges(), segments.text_lens, segments.grids,
                                                          segments.start, segments.step)], dim=1)
    B, S, H, Dh = x.shape
    axes_dim = tuple(axes_dim) if axes_dim is not None else default_axes_dim(Dh)
    xf = x.float()
    if (weight is not None and weight.dim() == 2) or (bias is not None and bias.dim() == 2):   # (G, Dh) rows
        xf = F.layer_norm(xf, (Dh,), None, None, eps)
        xf = xf if weight is None else xf * _per_head(weight, H)
        xf = xf if bias is None else xf + _per_head(bias, H)
    elif weight is not None or bias is not None:
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
def _segment(CU, TEXT, GRIDS, START, STEP, BLOCK_S: tl.constexpr):
    """VARLEN: program (token block, segment seg) -> seg's first packed row, length, text length, Hg, Wg, its rows of
    the start / step tables, and the batch loop's trip count: 1, or 0 for a block past the segment's end (the
    grid covers the longest segment: a shorter one's idle blocks load and store no x / dy / out / dx)."""
    seg = tl.program_id(1)
    row0 = tl.load(CU + seg)
    length = tl.load(CU + seg + 1) - row0
    Hg = tl.maximum(tl.load(GRIDS + 3 * seg + 1), 1)        # >= 1: defined divisions in a text-only segment
    Wg = tl.maximum(tl.load(GRIDS + 3 * seg + 2), 1)
    n_b = tl.where(tl.program_id(0) * BLOCK_S < length, 1, 0)
    # min: a no-op (text_len <= length), with which ptxas builds the packed forward at 96 registers, not 113
    # (sm_90, 5B shapes, tests/test_inspect.py)
    text_len = tl.minimum(tl.load(TEXT + seg), length)
    return row0, length, text_len, Hg, Wg, START + 3 * seg, STEP + 3 * seg, n_b


@triton.jit
def _group(GROUPS: tl.constexpr, VARLEN: tl.constexpr):
    """The weight row this program's heads take: the last launch axis when there are several (a constant 0, no
    program id, for GROUPS = 1)."""
    if GROUPS == 1:
        return 0
    return tl.program_id(2 if VARLEN else 1)


@triton.jit
def _rope3d_fwd_kernel(X, W, Bias, OUT, B, S, H, sxb, sxs, sxh, text_len, offset, Hg, Wg, START, STEP, log2_theta,
                       eps, CU, TEXT, GRIDS,
                       HEAD_DIM: tl.constexpr, DT: tl.constexpr, DH: tl.constexpr, NORM: tl.constexpr,
                       HAS_W: tl.constexpr, HAS_B: tl.constexpr, GROUPS: tl.constexpr, VARLEN: tl.constexpr,
                       BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    HALF: tl.constexpr = BLOCK_D // 2
    eps = tl.cast(eps, tl.float32)
    if VARLEN:                                     # B = 1 (or 0: idle); S, text_len, ... those of this segment
        row0, S, text_len, Hg, Wg, START, STEP, B = _segment(CU, TEXT, GRIDS, START, STEP, BLOCK_S)
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)                         # (BS,) token
    cos, sin, vision = _rope3d_cos_sin(s, text_len, offset, Hg, Wg, START, STEP, log2_theta, HEAD_DIM, DT, DH,
                                       BLOCK_D)
    cos = cos[:, None, :]                                                         # (BS, 1, HALF)
    sin = sin[:, None, :]
    vision = vision[:, None, None]                                                # (BS, 1, 1)
    c = tl.arange(0, BLOCK_D)
    c_ok = c < HEAD_DIM
    s64 = s.to(tl.int64)[:, None, None]                                           # 64-bit row offsets
    if VARLEN:
        s64 += row0                                                               # the packed row
    sc_ok = (s < S)[:, None, None] & c_ok[None, None, :]
    g = _group(GROUPS, VARLEN)
    NH = H * GROUPS                # H: the heads of one weight row (H // GROUPS on the host: no division here)
    if HAS_W:
        w = tl.load(W + g * HEAD_DIM + c, mask=c_ok, other=0.0).to(tl.float32)
    if HAS_B:
        bb = tl.load(Bias + g * HEAD_DIM + c, mask=c_ok, other=0.0).to(tl.float32)
    for b in range(B):
        for h0 in range(0, H, BLOCK_H):
            h = (H * g + h0 + tl.arange(0, BLOCK_H)).to(tl.int64)[None, :, None]
            mask = sc_ok & (h < H * g + H)                                # (BS, BH, BD)
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
            xe, xo = tl.split(tl.reshape(x, (BLOCK_S, BLOCK_H, HALF, 2)))     # pairs (2k, 2k+1)
            y = tl.reshape(tl.join(xe * cos - xo * sin, xo * cos + xe * sin), (BLOCK_S, BLOCK_H, BLOCK_D))
            y = tl.where(vision, y, x)
            out_off = ((tl.cast(b, tl.int64) * S + s64) * NH + h) * HEAD_DIM + c[None, None, :]
            tl.store(OUT + out_off, cast_rtne(y, OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rope3d_bwd_kernel(DY, X, W, DX, DW_PART, DB_PART, B, S, H, sxb, sxs, sxh, text_len, offset, Hg, Wg, START,
                       STEP, log2_theta, eps, CU, TEXT, GRIDS,
                       HEAD_DIM: tl.constexpr, DT: tl.constexpr, DH: tl.constexpr, NORM: tl.constexpr,
                       HAS_W: tl.constexpr, HAS_B: tl.constexpr, GROUPS: tl.constexpr, VARLEN: tl.constexpr,
                       BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    HALF: tl.constexpr = BLOCK_D // 2
    eps = tl.cast(eps, tl.float32)
    pid = tl.program_id(0)
    if VARLEN:
        row0, S, text_len, Hg, Wg, START, STEP, B = _segment(CU, TEXT, GRIDS, START, STEP, BLOCK_S)
        pid += tl.program_id(1) * tl.num_programs(0)                              # (segment, block)
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    cos, sin, vision = _rope3d_cos_sin(s, text_len, offset, Hg, Wg, START, STEP, log2_theta, HEAD_DIM, DT, DH,
                                       BLOCK_D)
    cos = cos[:, None, :]
    sin = sin[:, None, :]
    vision = vision[:, None, None]
    c = tl.arange(0, BLOCK_D)
    c_ok = c < HEAD_DIM
    s64 = s.to(tl.int64)[:, None, None]
    if VARLEN:
        s64 += row0
    sc_ok = (s < S)[:, None, None] & c_ok[None, None, :]
    g = _group(GROUPS, VARLEN)
    NH = H * GROUPS
    if HAS_W:
        w = tl.load(W + g * HEAD_DIM + c, mask=c_ok, other=0.0).to(tl.float32)
    # accumulated over tokens in the loop (axis 0 is per-thread in the usual layout: no shuffles), heads at the
    # end; zero for an idle VARLEN block, whose partial row is still written
    dw_acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    for b in range(B):
        for h0 in range(0, H, BLOCK_H):
            h = (H * g + h0 + tl.arange(0, BLOCK_H)).to(tl.int64)[None, :, None]
            mask = sc_ok & (h < H * g + H)
            # dy, dx: contiguous
            row_off = ((tl.cast(b, tl.int64) * S + s64) * NH + h) * HEAD_DIM + c[None, None, :]
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
    # one partial row per program, (block [, segment]) x group, summed on the host in a fixed order (deterministic,
    # no atomics)
    part = pid.to(tl.int64) * GROUPS * HEAD_DIM + g * HEAD_DIM   # scalar; g * HEAD_DIM as in W's (+26 registers if not)
    if HAS_W:
        tl.store(DW_PART + part + c, tl.sum(dw_acc, axis=0), mask=c_ok)
    if HAS_B:
        tl.store(DB_PART + part + c, tl.sum(db_acc, axis=0), mask=c_ok)


def rope3d_config(H: int, head_dim: int, backward: bool = False) -> dict:
    """Block sizes and warps: each loop step handles a (BLOCK_S tokens, BLOCK_H heads, BLOCK_D channels) tile.
    H: the heads of one weight row (H // G).

    Tiles of 4096 elements forward, 2048 backward (it holds x, dy and the LayerNorm terms at once): at CogVideoX
    shapes (Dh = 64, H = 30 or 48, bf16) that is 96 / 96 registers per thread and no spills (AOT sm_90 build, tests).
    30 heads pad to 32 (2 masked heads cost compute, not memory traffic). Programs: S / BLOCK_S = 4444 forward and
    8888 backward at S = 17,776, plenty for 132 SMs.
    """
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(H), 16)
    block_s = max(1, (2048 if backward else 4096) // (block_h * block_d))
    return {"BLOCK_S": block_s, "BLOCK_H": block_h, "BLOCK_D": block_d, "num_warps": 4}


def _groups(weight, bias) -> int:
    """G: the rows of a (G, Dh) weight / bias, 1 for (Dh,) or none."""
    p = weight if weight is not None else bias
    return p.shape[0] if p is not None and p.dim() == 2 else 1


def _launch(x, text_len, grid, start, step, theta, axes_dim, eps, offset, layout, G, backward):
    """-> (launch grid, number of programs, kernel arguments, meta-parameters). layout: None (dense) or
    (cu_seqlens, text lens, grids, max_len) of a packed x, start / step then the (n, 3) tables."""
    B, S, H, Dh = x.shape
    cfg = rope3d_config(H // G, Dh, backward)
    start, step = start.float().contiguous(), step.float().contiguous()   # read with unit stride
    if layout is None:
        T, Hg, Wg = grid
        cu = seg_text = seg_grids = start                              # not read (VARLEN = 0)
        launch = (triton.cdiv(S, cfg["BLOCK_S"]),)
    else:
        cu, seg_text, seg_grids, max_len = layout
        text_len, offset, Hg, Wg = 0, 0, 1, 1                          # per segment, from the tables
        launch = (triton.cdiv(max_len, cfg["BLOCK_S"]), cu.shape[0] - 1)
    n_prog = math.prod(launch)                                          # partial rows per group
    if G > 1:
        launch += (G,)                                                   # one program per weight row's heads
    # H // G: the heads of one weight row (a division in the kernel cost the G = 2 build 32 registers); Hg, Wg >= 1
    # keeps the kernel's integer divisions defined when there are no vision tokens
    args = [B, S, H // G, x.stride(0), x.stride(1), x.stride(2), text_len, offset, max(Hg, 1), max(Wg, 1), start,
            step, math.log2(theta), float(eps), cu, seg_text, seg_grids]
    meta = {"HEAD_DIM": Dh, "DT": axes_dim[0], "DH": axes_dim[1], "GROUPS": G, "VARLEN": int(layout is not None),
            "BLOCK_S": cfg["BLOCK_S"], "BLOCK_H": cfg["BLOCK_H"], "BLOCK_D": cfg["BLOCK_D"],
            "num_warps": cfg["num_warps"]}
    return check_grid(launch), n_prog, args, meta


def _param(p, fallback):
    return p.contiguous() if p is not None else fallback              # (Dh,) or (G, Dh), rows read at stride Dh


def rope3d_fwd(x, text_len, grid, start, step, theta, axes_dim, weight, bias, eps, offset=0, layout=None):
    """Launch the forward kernel. x: (B, S, H, Dh), last stride 1; start, step (3,) fp32 tensors on x's device
    ((n, 3) with a packed layout, see _launch) -> out (B, S, H, Dh) contiguous."""
    x = last_dim_contiguous(x)
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    grid_, _, args, meta = _launch(x, text_len, grid, start, step, theta, axes_dim, eps, offset, layout,
                                   _groups(weight, bias), False)
    norm = int(weight is not None or bias is not None)
    _rope3d_fwd_kernel[grid_](x, _param(weight, x), _param(bias, x), out, *args, **meta, NORM=norm,
                              HAS_W=int(weight is not None), HAS_B=int(bias is not None))
    return out


def rope3d_bwd(dy, x, text_len, grid, start, step, theta, axes_dim, weight, bias, eps, offset=0, layout=None):
    """Launch the backward kernel -> dx (like dy), dweight, dbias (shaped like weight / bias; None when absent).

    x is only read when there is a LayerNorm (the rotation alone is linear); pass None otherwise.
    """
    dy = dy.contiguous()
    B, S, H, Dh = dy.shape
    norm = weight is not None or bias is not None
    x = last_dim_contiguous(x) if norm else dy
    dx = torch.empty_like(dy)
    G = _groups(weight, bias)
    grid_, n_prog, args, meta = _launch(x, text_len, grid, start, step, theta, axes_dim, eps, offset, layout, G,
                                        True)
    dw_part = torch.empty((n_prog if weight is not None else 0, G, Dh), device=dy.device, dtype=torch.float32)
    db_part = torch.empty((n_prog if bias is not None else 0, G, Dh), device=dy.device, dtype=torch.float32)
    if dy.numel() > 0:
        _rope3d_bwd_kernel[grid_](dy, x, _param(weight, dy), dx, dw_part, db_part, *args, **meta, NORM=int(norm),
                                  HAS_W=int(weight is not None), HAS_B=int(bias is not None))
    else:                                       # B = 0: no launch, the sums are 0
        dw_part.zero_()
        db_part.zero_()
    dweight = dw_part.sum(0).view(weight.shape).to(weight.dtype) if weight is not None else None
    dbias = db_part.sum(0).view(bias.shape).to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias


def _per_head(p, H):
    """(Dh,) or (G, Dh) parameter -> fp32, broadcastable over (B, S, H, Dh): head h takes row h // (H // G)."""
    return p.float() if p.dim() == 1 else p.float().repeat_interleave(H // p.shape[0], dim=0)


def _head_sum(t, p):
    """(B, S, H, Dh) per-element terms -> the gradient of parameter p ((Dh,) or (G, Dh)), fp32."""
    if p.dim() == 1:
        return t.sum((0, 1, 2))
    return t.sum((0, 1)).view(p.shape[0], -1, t.shape[-1]).sum(1)


def _rope3d_bwd_ref(dy, x, text_len, grid, start, step, theta, axes_dim, weight, bias, eps, offset=0,
                    segments=None):
    """Pure-torch backward in fp32 (explicit: autograd is off inside a custom op's implementation).

    x is only needed for the LayerNorm; pass None without one. segments: a packed (1, N, H, Dh) dy / x, each
    segment on its own (text_len, grid, start, step unused), dweight / dbias summed over them in fp32.
    """
    if segments is not None:
        parts = [_rope3d_bwd_ref(dy[:, a:b], None if x is None else x[:, a:b], L, g, s0, s1, theta, axes_dim,
                                 weight, bias, eps, 0, None)
                 for (a, b), L, g, s0, s1 in zip(segments.ranges(), segments.text_lens, segments.grids,
                                                 segments.start, segments.step)]
        dx = torch.cat([p[0] for p in parts], dim=1)
        dw, db = (None if p is None else sum(part[i] for part in parts) for i, p in ((1, weight), (2, bias)))
    else:
        dx, dw, db = _rope3d_bwd_f32(dy, x, text_len, grid, start, step, theta, axes_dim, weight, bias, eps, offset)
    return (dx.to(dy.dtype), None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype))


def _rope3d_bwd_f32(dy, x, text_len, grid, start, step, theta, axes_dim, weight, bias, eps, offset):
    dyf = dy.float()
    n_text, cos, sin = _shard_table(dy.shape[1], text_len, grid, start, step, theta, axes_dim, dy.device, offset)
    vis = dyf[:, n_text:]                                            # (B, N, H, Dh)
    rotated = torch.stack([vis[..., 1::2], -vis[..., 0::2]], dim=-1).flatten(-2)      # R(ang)^T = R(-ang)
    dz = torch.cat([dyf[:, :n_text], vis * cos[None, :, None] + rotated * sin[None, :, None]], dim=1)
    if weight is None and bias is None:
        return dz, None, None
    xs = x.float() - x[..., :1].float()                              # shifted by channel 0, as the kernels
    xc = xs - xs.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    xhat = xc * rstd
    dxhat = dz if weight is None else dz * _per_head(weight, dy.shape[2])
    dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    dw = None if weight is None else _head_sum(dz * xhat, weight)
    db = None if bias is None else _head_sum(dz, bias)
    return dx, dw, db


def _layout(cu_seqlens, seg_text_lens, seg_grids, max_len):
    return None if cu_seqlens is None else (cu_seqlens, seg_text_lens, seg_grids, max_len)


def _host_segments(x, start, step, cu_seqlens, seg_text_lens, seg_grids):
    """The reference path of a packed call: the host layout back from the op's tensors (one sync, CPU anyway)."""
    return Segments(seg_text_lens.tolist(), seg_grids.tolist(), start.tolist(), step.tolist(), device=x.device)


# Packed (varlen) calls: cu_seqlens (n+1,), seg_text_lens (n,), seg_grids (n, 3) int32 and max_len given; start /
# step are then the (n, 3) fp32 tables of the segments' positions, text_len / grid / offset unused (0, [0, 0, 0], 0).
@torch.library.custom_op("cogvideox::rope3d", mutates_args=())
def _rope3d_op(x: torch.Tensor, text_len: int, grid: Sequence[int], start: torch.Tensor, step: torch.Tensor,
               theta: float, axes_dim: Sequence[int], weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float, offset: int = 0, cu_seqlens: Optional[torch.Tensor] = None,
               seg_text_lens: Optional[torch.Tensor] = None, seg_grids: Optional[torch.Tensor] = None,
               max_len: int = 0) -> torch.Tensor:
    if use_triton(x):
        return rope3d_fwd(x, text_len, grid, start, step, theta, axes_dim, weight, bias, eps, offset,
                          _layout(cu_seqlens, seg_text_lens, seg_grids, max_len))
    if cu_seqlens is not None:
        seg = _host_segments(x, start, step, cu_seqlens, seg_text_lens, seg_grids)
        return rope3d_ref(x, None, None, theta=theta, axes_dim=axes_dim, weight=weight, bias=bias, eps=eps,
                          segments=seg).contiguous()
    return rope3d_ref(x, text_len, grid, start, step, theta, axes_dim, weight, bias, eps, offset).contiguous()


@_rope3d_op.register_fake
def _(x, text_len, grid, start, step, theta, axes_dim, weight, bias, eps, offset=0, cu_seqlens=None,
      seg_text_lens=None, seg_grids=None, max_len=0):
    return x.new_empty(x.shape)


@torch.library.custom_op("cogvideox::rope3d_bwd", mutates_args=())
def _rope3d_bwd_op(dy: torch.Tensor, x: Optional[torch.Tensor], text_len: int, grid: Sequence[int],
                   start: torch.Tensor, step: torch.Tensor, theta: float, axes_dim: Sequence[int],
                   weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float, offset: int = 0,
                   cu_seqlens: Optional[torch.Tensor] = None, seg_text_lens: Optional[torch.Tensor] = None,
                   seg_grids: Optional[torch.Tensor] = None,
                   max_len: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # a custom op cannot return None: absent dweight / dbias come back as empty tensors
    if use_triton(dy):
        dx, dw, db = rope3d_bwd(dy, x, text_len, grid, start, step, theta, axes_dim, weight, bias, eps, offset,
                                _layout(cu_seqlens, seg_text_lens, seg_grids, max_len))
    else:
        seg = None if cu_seqlens is None else _host_segments(dy, start, step, cu_seqlens, seg_text_lens, seg_grids)
        dx, dw, db = _rope3d_bwd_ref(dy.contiguous(), x, text_len, grid, start, step, theta, axes_dim, weight,
                                     bias, eps, offset, seg)
    return dx, dy.new_empty(0) if dw is None else dw, dy.new_empty(0) if db is None else db


@_rope3d_bwd_op.register_fake
def _(dy, x, text_len, grid, start, step, theta, axes_dim, weight, bias, eps, offset=0, cu_seqlens=None,
      seg_text_lens=None, seg_grids=None, max_len=0):
    return (dy.new_empty(dy.shape), dy.new_empty(0) if weight is None else weight.new_empty(weight.shape),
            dy.new_empty(0) if bias is None else bias.new_empty(bias.shape))


def _setup_context(ctx, inputs, output):
    x, text_len, grid, start, step, theta, axes_dim, weight, bias, eps, offset, cu, seg_text, seg_grids, \
        max_len = inputs
    norm = weight is not None or bias is not None
    ctx.save_for_backward(x if norm else None, weight, bias, start, step, cu, seg_text, seg_grids)  # no norm: no x
    ctx.args = (text_len, grid, theta, axes_dim)
    ctx.eps, ctx.offset, ctx.max_len = eps, offset, max_len


def _backward(ctx, dy):
    x, weight, bias, start, step, cu, seg_text, seg_grids = ctx.saved_tensors
    text_len, grid, theta, axes_dim = ctx.args
    dx, dw, db = _rope3d_bwd_op(dy.contiguous(), x, text_len, grid, start, step, theta, axes_dim, weight, bias,
                                ctx.eps, ctx.offset, cu, seg_text, seg_grids, ctx.max_len)
    return (dx, None, None, None, None, None, None, dw if weight is not None else None,
            db if bias is not None else None, None, None, None, None, None, None)


_rope3d_op.register_autograd(_backward, setup_context=_setup_context)


def _check_layout(x, text_len, grid, offset):
    """The dense / context-parallel layout: text_len, grid (T, Hg, Wg) and offset against x's S."""
    S = x.shape[1]
    check_text_len(text_len, S if offset is None else None)
    if grid is None or len(grid) != 3 or any((not isinstance(g, int)) or g < 0 for g in grid):
        raise ValueError(f"grid must be three non-negative ints (T, Hg, Wg), got {grid}")
    n_vis = grid[0] * grid[1] * grid[2]
    if offset is None and text_len + n_vis != S:
        raise ValueError(f"grid {tuple(grid)} holds {n_vis} vision tokens but S - text_len = {S - text_len}")
    if offset is not None and check_offset(offset) + S > text_len + n_vis:
        raise ValueError(f"offset + S = {offset} + {S} exceeds the joint sequence: text_len + T*Hg*Wg = "
                         f"{text_len} + {n_vis}")


def _check_segment_call(x, text_len, grid, start, step, offset, segments):
    """A packed call: the layout is the segments' alone."""
    check_segments(segments)
    if text_len is not None or grid is not None:
        raise ValueError(f"with segments, text_len and grid must be None (each segment has its own), got "
                         f"text_len={text_len}, grid={grid}")
    for name, v, default in (("start", start, (0.0, 0.0, 0.0)), ("step", step, (1.0, 1.0, 1.0))):
        if isinstance(v, torch.Tensor) or not isinstance(v, (tuple, list)) or tuple(v) != default:
            raise ValueError(f"with segments, {name} must be left at its default: the positions are the "
                             f"segments' (Segments(start=, step=)), got {name}={v}")
    if offset is not None:
        raise ValueError(f"with segments, offset must be None (a packed sequence is not a shard), got {offset}")
    segments.check("x", x)


def _check_params(x, weight, bias):
    """weight / bias: None, (Dh,) shared by every head, or (G, Dh) with H % G == 0 (head h takes row
    h // (H // G)); given both, the same shape."""
    H, Dh = x.shape[2], x.shape[3]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        check_tensor(name, p)
        check_like(name, p, "x", x, dtype=False)
        if p.dim() not in (1, 2) or p.shape[-1] != Dh or (p.dim() == 2 and (p.shape[0] < 1 or H % p.shape[0])):
            raise ValueError(f"{name} must be (Dh={Dh},) or (G, {Dh}) with G dividing the {H} heads, got shape "
                             f"{tuple(p.shape)}")
    if weight is not None and bias is not None and weight.shape != bias.shape:
        raise ValueError(f"weight {tuple(weight.shape)} and bias {tuple(bias.shape)} must have the same shape")


def _check(x, text_len, grid, axes_dim, weight, bias, offset):
    check_tensor("x", x, ndim=4)
    _check_layout(x, text_len, grid, offset)
    return _check_common(x, axes_dim, weight, bias)


def _check_common(x, axes_dim, weight, bias):
    Dh = x.shape[3]
    axes_dim = tuple(axes_dim) if axes_dim is not None else default_axes_dim(Dh)
    if len(axes_dim) != 3 or any(d <= 0 or d % 2 for d in axes_dim):
        raise ValueError(f"axes_dim must be three positive even ints, got {axes_dim}")
    if sum(axes_dim) != Dh:
        raise ValueError(f"axes_dim {axes_dim} must sum to the head dim {Dh}")
    _check_params(x, weight, bias)
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
           weight=None, bias=None, eps=1e-6, offset=None, segments=None):
    """x: (B, S, H, Dh) q or k (any strides, last one 1); grid (T, Hg, Wg) of the vision tokens -> out (B, S, H, Dh).

    start / step: per-axis (t, h, w) positions start + index * step (fractional at non-native resolutions), each
    three floats or an fp32 (3,) tensor on x's device. Either way torch.compile treats them as data (one graph
    for every resolution). Floats cost one small asynchronous host-to-device copy per call; a model that calls
    rope3d in every layer builds the tensors once per forward instead (cogvideox.transformer does).
    weight / bias: LayerNorm affine, (Dh,) shared by all heads or (G, Dh) with H % G == 0, head h taking row
    h // (H // G) (q and k in one call: x the (B, S, 2H, Dh) view of both, weight torch.stack([w_q, w_k]));
    LayerNorm runs on every token when either is given. dweight / dbias come back in the same shape.
    offset: None, x is the whole sequence (S = text_len + T*Hg*Wg); an int, x is the context-parallel shard
    [offset, offset + S) of it (offset + S <= text_len + T*Hg*Wg), text_len still the global text length.
    segments: a kernels.Segments; x is the packed (1, N, H, Dh) sequence of its segments, each rotated with its
    own text length, grid and positions, exactly as if run alone. text_len and grid must then be None, start /
    step and offset left at their defaults.
    """
    if segments is not None:
        check_tensor("x", x, ndim=4)
        _check_segment_call(x, text_len, grid, start, step, offset, segments)
        axes_dim = _check_common(x, axes_dim, weight, bias)
        theta = check_positive_float("theta", theta)
        return _rope3d_op(x, 0, [0, 0, 0], segments.start_t, segments.step_t, theta, list(axes_dim), weight, bias,
                          check_eps(eps), 0, segments.cu_seqlens, segments.text_lens_t, segments.grids_t,
                          segments.max_len)
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
