"""GroupNorm (+ SpatialNorm modulation) + SiLU, written straight into the causally padded conv input.

This is the sequence before every causal conv of the CogVideoX VAE (diffusers' ResnetBlock3D: norm -> SiLU ->
CausalConv3d):
    h   = group_norm(x, num_groups, weight, bias, eps)     statistics over (C/G, T, H, W) of this chunk
    h   = h * zq_scale + zq_shift                          SpatialNorm3D: zq_scale = conv_y(zq), zq_shift = conv_b(zq)
    h   = silu(h)                                          (if silu)
    out, new_cache = causal_pad3d(h, kernel_t, cache, pad_hw, mode="first")
fp32 inside, one rounding to x.dtype at the store. Fused: diffusers runs group_norm, two elementwise ops, silu, cat
and clone (~6 passes over the activation); here it is one read for the statistics and one read + one write, or
one read + one write where a group fits one program.

Statistics are of d = x - shift, shift = the group's first element, kept as stats = (shift, mean(d)) and applied as
(x - shift) - mean(d): exact for a constant group (out = bias; a mean rounded to fp32 left 0.70 at 12345.678, and
torch 2.13's CPU F.group_norm gives -0.83 there, fp32, 1x4x2x3x8, 2 groups), no cancellation far from zero. The
pure-torch path computes the same way.

What runs when (the sm_90 builds at the launch arguments: kernels._static, `python -m bench kernels --static`):
A. A (b, group) chunk that fits one program (fused_blocks: Cg, T and H x W rounded up to powers of two multiply
   to <= FUSED_MAX = 8192 elements), no spatial pad and contiguous frames (the tests' shapes, the VAE at low
   resolution such as 128 channels x 2 frames x 32 x 32; no VAE layer at 480 x 720 fits): one launch each way,
   one program per chunk holding the whole chunk in registers as one (channel, frame, element) block. Forward
   (_gn_fused_fwd_kernel, B x G programs): x read once, two-pass statistics from the registers (exact, no
   partials), out and new_cache written once, the cache copied into the front frames. Backward
   (_gn_fused_bwd_kernel, G programs, each walking b in order so that dweight / dbias need no partials): dout, x
   and zq read once, dx, dzq and dcache written once. Why 8192: at 8 warps (32 elements a thread) the sm_90 builds
   (kernels._static, triton 3.9, 2026-12-02) at 4 x 2 x 32 x 32 take 93 registers forward and 175 backward, no
   spills; at 16,384 the backward spills at 16 warps (the 128-register cap) and at 8 (255), while the forward
   would still fit (93 at 16 warps). One threshold serves both. Such a chunk is expected to cost launch latency
   rather than bandwidth (one launch instead of two or three; not measured on a GPU); with B x G programs most
   SMs idle, so larger chunks take path B.
B. Otherwise, forward in two launches:
   1. _gn_stats_kernel: one program per chunk of one (b, c, t) frame: CHUNK = ITERS x BLOCK elements (BLOCK <=
      2048, 8 warps: one 16-byte bf16 vector a thread; ITERS <= 8), so one video with 32 groups still fills a GPU:
      the VAE's (1, 128, 9, 480, 720) chunk runs 128 x 9 x 22 = 25,344 programs, (1, 512, 3, 60, 90) 1,536. Per
      lane sums of d and d^2 (two FMAs an element), per program (count, mean, M2 = sum d^2 - mean sum d).
      Contiguous frames are walked flat (no division per element) with sizes and strides divided by VEC.
   2. Without a spatial pad (how cogvideox.vae calls it) and with contiguous frames, _gn_apply_flat_kernel: one
      program per up to 8 x 2048 elements of one output frame (128-bit loads and stores); else _gn_apply_kernel on
      causal_pad3d's 2-D tiles (8 x 256 output tiles, scalar accesses at padded row pitches). Each program first
      merges its group's Cg x T x n_chunks partials itself (_group_stats: total count and mean, then
      M2 = sum(M2_i + n_i (mean_i - mean)^2), a fixed order, so every program of a group gets the same bits and
      the result is deterministic; one program per group stores stats / rstd for the backward). That replaces a
      combine launch with L2 reads: 792 partials (9.5 KB) a program at 480 x 720, 30,976 programs, 294 MB from L2
      against the op's 4,335 MB from DRAM (7%, a prediction from the launch arguments, not measured).
      Normalize, affine, modulate, SiLU, (zero the spatial border), store out and, for the last kernel_t - 1
      frames, new_cache. Front frames are the cache (copied as is) or the normalized frame 0.
   x is read twice (statistics, normalize): a group (25 MB at 480 x 720) must be complete before any output, and
   no group stays on chip, so that is the minimum (bench/flops.py counts it; with fits=True, path A's one read).
   Backward in two launches (deterministic, no atomics):
   1. _gn_bwd_kernel, DX=0 (stats tiling, BLOCK 1024 at 4 warps: 8 elements a thread): recompute h, write
      dzq_scale = dm * a and dzq_shift = dm, and per program the partial sums of da and da * xhat (a = affine
      output, m = modulated, da = dL/da).
   2. _gn_bwd_kernel, DX=1 (recomputing h rather than storing da): each program merges its group's partials into
      c1, c2 = the group means of dxhat and dxhat * xhat (a fixed order; 1,548 partials, 12 KB a program from L2
      at 480 x 720, 613 MB over 49,536 programs against 9,113 MB from DRAM: 7%, predicted), then
      dx = rstd (da w - c1 - xhat c2); the program at (b, t, chunk) = 0 of each channel sums the channel's
      partials over b into dweight and dbias. Two passes over dout, x and zq are the minimum: the group means must
      be complete before any dx, and keeping da between the passes would cost an fp32 write and read of x's size.
   dcache is the causal_pad3d backward restricted to the cache frames (one more launch, with a cache only).
In both backward paths dy is gathered from the output grad (its own padded position, the front frames for frame 0
without a cache, new_cache's grad), never scattered.
Offsets: frame base offsets are int64 (2.17e9-element activations); offsets inside one frame are int32.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._dispatch import check_grid, check_like, check_params, check_shape, check_tensor, last_dim_contiguous, \
    use_triton
from ._triton_common import cast_rtne
from .causal_pad3d import _check as _check_pad
from .causal_pad3d import FLAT_BLOCK, _check_frame_span, _frames, _grid, _pad_tile, _store_padded, _tile, \
    causal_pad3d_bwd, causal_pad3d_bwd_ref, causal_pad3d_ref, flat_frames, vec_width

COMBINE_BLOCK = 1024   # partials merged per step by _gn_combine_kernel (one program per (b, group))


def group_norm_silu_pad_ref(x, num_groups, weight=None, bias=None, eps=1e-6, kernel_t=3, cache=None,
                            pad_hw=(1, 1), zq_scale=None, zq_shift=None, silu=True):
    # GroupNorm from the shifted statistics, not F.group_norm: torch's CPU kernel normalizes a constant group of
    # 12345.678 to -0.83 instead of 0
    B, C = x.shape[:2]
    xf = x if x.dtype == torch.float64 else x.float()
    stats, rstd = _group_stats_ref(xf, num_groups, eps)
    h = ((xf.reshape(B, num_groups, -1) - stats[..., :1]) - stats[..., 1:]) * rstd[..., None]
    h = h.reshape(x.shape)
    if weight is not None:
        h = h * weight.to(xf.dtype).reshape(1, C, 1, 1, 1)
    if bias is not None:
        h = h + bias.to(xf.dtype).reshape(1, C, 1, 1, 1)
    if zq_scale is not None:
        h = h * zq_scale.to(xf.dtype) + zq_shift.to(xf.dtype)
    if silu:
        h = F.silu(h)
    return causal_pad3d_ref(h.to(x.dtype), kernel_t, cache, pad_hw, "first")


def _group_stats_ref(x, num_groups, eps):
    """stats (B, G, 2) = (shift, mean - shift) with shift = the group's first element, rstd (B, G); fp32 (fp64 for
    fp64 x). The statistics of x - shift: exact for a constant group, no cancellation for data far from zero."""
    xg = (x if x.dtype == torch.float64 else x.float()).reshape(x.shape[0], num_groups, -1)
    shift = xg[..., 0]
    var, mean = torch.var_mean(xg - shift[..., None], dim=-1, unbiased=False)
    return torch.stack([shift, mean], dim=-1), torch.rsqrt(var + eps)


def group_norm_silu_pad_bwd_ref(dout, dnc, x, weight, bias, zq_scale, zq_shift, mean, rstd, num_groups, kernel_t,
                                has_cache, pad_h, pad_w, silu):
    """The gradient of group_norm_silu_pad_ref written out in fp32 torch (autograd is off inside a custom op's impl):
    (dx, dweight, dbias, dzq_scale, dzq_shift, dcache), empty tensors for absent inputs."""
    B, C, T, H, W = x.shape
    G = num_groups
    dy, dcache = causal_pad3d_bwd_ref(dout.float(), None if dnc is None else dnc.float(), T, kernel_t, pad_h, pad_w,
                                      "first", has_cache)         # dy: (B, C, T, H, W) fp32, dL/dh
    dcache = dcache.to(x.dtype)
    per_group = (B, G, 1, 1, 1, 1)
    shift, mean_d = mean[..., 0].reshape(per_group), mean[..., 1].reshape(per_group)   # mean: stats (B, G, 2)
    xhat = ((x.float().reshape(B, G, C // G, T, H, W) - shift) - mean_d) * rstd.reshape(per_group)
    xhat = xhat.reshape(B, C, T, H, W)
    w = weight.float().reshape(1, C, 1, 1, 1) if weight is not None else None
    a = xhat * w if w is not None else xhat
    a = a + bias.float().reshape(1, C, 1, 1, 1) if bias is not None else a
    m = a * zq_scale.float() + zq_shift.float() if zq_scale is not None else a
    if silu:
        s = torch.sigmoid(m)
        dm = dy * s * (1 + m * (1 - s))
    else:
        dm = dy
    empty = x.new_empty                                    # a fresh empty tensor for each absent input: no aliasing
    dzs, dzb = ((dm * a).to(zq_scale.dtype), dm.to(zq_shift.dtype)) if zq_scale is not None else (empty(0), empty(0))
    da = dm * zq_scale.float() if zq_scale is not None else dm
    dweight = (da * xhat).sum((0, 2, 3, 4)).to(weight.dtype) if weight is not None else empty(0)
    dbias = da.sum((0, 2, 3, 4)).to(bias.dtype) if bias is not None else empty(0)
    dxhat = (da * w if w is not None else da).reshape(B, G, -1)
    xhat = xhat.reshape(B, G, -1)
    dx = rstd[..., None] * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    return dx.reshape(x.shape).to(x.dtype), dweight, dbias, dzs, dzb, dcache


@triton.jit
def _frame_chunk(n_chunks, C, T):
    """The program of the frame-walking kernels -> pid, its chunk of frame bct = (b * C + c) * T + t, b, c, t
    (int64 scalars)."""
    pid = tl.program_id(0).to(tl.int64)
    bct = pid // n_chunks
    bc = bct // T
    return pid, pid % n_chunks, bct, bc // C, bc % C, bct % T


@triton.jit
def _frame_offsets(idx, W, sxh, FLAT: tl.constexpr):
    """Offsets inside one (H, W) frame of the elements idx (row-major): idx itself when the frame is contiguous
    (no per-element division), else row * row stride + column."""
    if FLAT:
        return idx
    return (idx // W) * sxh + idx % W


@triton.jit
def _gn_stats_kernel(x_ptr, part_ptr, C, Cg, T, W, HWV, n_chunks, sxb, sxc, sxt, sxh,
                     FLAT: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    # Sizes and strides arrive divided by VEC and are multiplied back by the constexpr (see causal_pad3d's
    # _flat_chunk): with them the compiler knows every access is VEC-aligned, so loads are 16-byte vectors.
    pid, chunk, bct, b, c, t = _frame_chunk(n_chunks, C, T)
    HW = HWV * VEC
    # Sums of d = x - shift, shift = the group's first element: exact for a constant group (d = 0, so the mean is
    # shift and the variance 0, as torch gives), and no cancellation for data far from zero (d is exact when x is
    # near shift, Sterbenz). Per program: count, mean of d, M2 = sum d^2 - (sum d) mean; merged by Chan's formula.
    shift = tl.load(x_ptr + (b * sxb + (c // Cg) * Cg * sxc) * VEC).to(tl.float32)
    x_frame = x_ptr + (b * sxb + c * sxc + t * sxt) * VEC
    s1 = tl.zeros([BLOCK], dtype=tl.float32)
    s2 = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ITERS):
        idx = (chunk * ITERS * BLOCK + i * BLOCK).to(tl.int32) + tl.arange(0, BLOCK)
        mask = idx < HW
        v = tl.load(x_frame + _frame_offsets(idx, W, sxh * VEC, FLAT), mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, v - shift, 0.0)
        s1 += d
        s2 += d * d
    n = tl.minimum(HW - chunk * ITERS * BLOCK, ITERS * BLOCK).to(tl.float32)
    sum1 = tl.sum(s1)
    mean = sum1 / n
    tl.store(part_ptr + pid * 3, n)
    tl.store(part_ptr + pid * 3 + 1, mean)
    tl.store(part_ptr + pid * 3 + 2, tl.maximum(tl.sum(s2) - sum1 * mean, 0.0))


@triton.jit
def _group_stats(part_ptr, x_ptr, stats_ptr, rstd_ptr, grp, P, shift_off, eps, first, BLOCK_P: tl.constexpr):
    """-> (shift, mean of d, rstd) of group grp = b * G + g, merged from its P contiguous partials (count, mean, M2)
    by Chan's formula in a fixed order (total count and mean first, then M2 = sum(M2_i + n_i (mean_i - mean)^2)):
    every program of the group computes the same bits. shift_off: the group's first element in x. The program
    with first set stores them for the backward."""
    parts = part_ptr + grp * P * 3
    acc_n = tl.zeros([BLOCK_P], dtype=tl.float32)
    acc_s = tl.zeros([BLOCK_P], dtype=tl.float32)
    for start in range(0, P, BLOCK_P):
        i = start + tl.arange(0, BLOCK_P)
        cnt = tl.load(parts + i * 3, mask=i < P, other=0.0)
        acc_n += cnt
        acc_s += cnt * tl.load(parts + i * 3 + 1, mask=i < P, other=0.0)
    n = tl.sum(acc_n)
    mean = tl.sum(acc_s) / n
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for start in range(0, P, BLOCK_P):                     # the second read of the partials hits L1
        i = start + tl.arange(0, BLOCK_P)
        cnt = tl.load(parts + i * 3, mask=i < P, other=0.0)
        d = tl.load(parts + i * 3 + 1, mask=i < P, other=0.0) - mean
        acc += tl.load(parts + i * 3 + 2, mask=i < P, other=0.0) + cnt * d * d
    rstd = 1.0 / tl.sqrt((tl.sum(acc) / n + eps).to(tl.float32))   # eps may arrive as fp64
    # stats = (shift, mean - shift): the kernels normalize (x - shift) - mean_d, which never rounds the mean to
    # x's magnitude (for x ~ 12345 that rounding alone would cost 0.5 ulp = 5e-4 before the rstd multiply)
    shift = tl.load(x_ptr + shift_off).to(tl.float32)
    if first:
        tl.store(stats_ptr + grp * 2, shift)
        tl.store(stats_ptr + grp * 2 + 1, mean)
        tl.store(rstd_ptr + grp, rstd)
    return shift, mean, rstd


@triton.jit
def _normalize(v, shift, mean, rstd):
    """xhat of x values v (fp32) of a group with statistics (shift, mean of x - shift, rstd)."""
    return ((v - shift) - mean) * rstd


@triton.jit
def _gn_activation(y, w_ptr, b_ptr, zs, zb, c, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ZQ: tl.constexpr,
                   SILU: tl.constexpr):
    """xhat -> silu((xhat w + b) zq_scale + zq_shift), fp32."""
    if HAS_W:
        y = y * tl.load(w_ptr + c).to(tl.float32)
    if HAS_B:
        y = y + tl.load(b_ptr + c).to(tl.float32)
    if HAS_ZQ:
        y = y * zs.to(tl.float32) + zb.to(tl.float32)
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    return y


@triton.jit
def _source_frame(tp, KT, HAS_CACHE: tl.constexpr):
    """Padded output frame tp -> (front: one of the KT front frames; from_x: its values are x's (not the cache's);
    t_src: the x frame they come from). Without a cache the front frames are the normalized frame 0."""
    front = tp < KT
    if HAS_CACHE:
        from_x = tp >= KT
    else:
        from_x = tp >= 0
    return front, from_x, tl.maximum(tp - KT, 0)


@triton.jit
def _gn_apply_kernel(x_ptr, cache_ptr, zs_ptr, zb_ptr, w_ptr, b_ptr, part_ptr, stats_ptr, rstd_ptr, out_ptr, nc_ptr,
                     C, G, T, H, W, KT, PH, PW, Tp, Ho, Wo, n_hb, P, eps,
                     sxb, sxc, sxt, sxh, scb, scc, sct, sch, ssb, ssc, sst, ssh, szb, szc, szt, szh,
                     HAS_CACHE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ZQ: tl.constexpr,
                     SILU: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_P: tl.constexpr):
    plane, tp, bc, h_out, w_out, in_out, h_in, w_in = _pad_tile(n_hb, Tp, Ho, Wo, PH, PW, BLOCK_H, BLOCK_W)
    b = bc // C
    c = bc % C
    Cg = C // G
    first = (c % Cg == 0) & (tp == 0) & (tl.program_id(0) % n_hb == 0) & (tl.program_id(1) == 0)
    shift, mean, rstd = _group_stats(part_ptr, x_ptr, stats_ptr, rstd_ptr, b * G + c // Cg, P,
                                     b * sxb + (c // Cg) * Cg * sxc, eps, first, BLOCK_P)
    valid = in_out & (h_in >= 0) & (h_in < H) & (w_in >= 0) & (w_in < W)
    # scalar conditions enter masks through tl.where: the interpreter mistypes `block & scalar_bool` as an int mask
    front, from_x, t_src = _source_frame(tp, KT, HAS_CACHE)
    x_mask = tl.where(from_x, valid, False)
    v = tl.load(x_ptr + b * sxb + c * sxc + t_src * sxt + h_in * sxh + w_in, mask=x_mask, other=0.0)
    zs = 0.0
    zb = 0.0
    if HAS_ZQ:
        zs = tl.load(zs_ptr + b * ssb + c * ssc + t_src * sst + h_in * ssh + w_in, mask=x_mask, other=0.0)
        zb = tl.load(zb_ptr + b * szb + c * szc + t_src * szt + h_in * szh + w_in, mask=x_mask, other=0.0)
    y = _normalize(v.to(tl.float32), shift, mean, rstd)
    y = _gn_activation(y, w_ptr, b_ptr, zs, zb, c, HAS_W, HAS_B, HAS_ZQ, SILU)
    val = cast_rtne(tl.where(valid, y, 0.0), out_ptr.dtype.element_ty)          # the spatial border is zeros
    if HAS_CACHE:
        c_ptrs = cache_ptr + b * scb + c * scc + tl.minimum(tp, KT - 1) * sct + h_in * sch + w_in
        val = tl.where(front, tl.load(c_ptrs, mask=tl.where(front, valid, False), other=0.0), val)
    _store_padded(out_ptr, nc_ptr, val, plane, tp, bc, h_out, w_out, in_out, h_in, w_in, valid, H, W, KT, Tp,
                  Ho, Wo)


@triton.jit
def _gn_apply_flat_kernel(x_ptr, cache_ptr, zs_ptr, zb_ptr, w_ptr, b_ptr, part_ptr, stats_ptr, rstd_ptr, out_ptr,
                          nc_ptr, C, G, KT, Tp, n_chunks, HWV, P, eps,
                          sxb, sxc, sxt, scb, scc, sct, ssb, ssc, sst, szb, szc, szt,
                          HAS_CACHE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ZQ: tl.constexpr,
                          SILU: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
                          BLOCK_P: tl.constexpr):
    """No spatial padding and contiguous frames: one program per ITERS x BLOCK elements of one output frame (the
    group's partials are merged once per program), every access a VEC-wide vector (sizes and strides arrive
    divided by VEC, see causal_pad3d's _flat_chunk)."""
    pid = tl.program_id(0).to(tl.int64)
    plane = pid // n_chunks                                # bc * Tp + tp
    chunk = pid % n_chunks
    HW = HWV * VEC
    tp = plane % Tp
    bc = plane // Tp
    b = bc // C
    c = bc % C
    Cg = C // G
    first = (c % Cg == 0) & (tp == 0) & (chunk == 0)      # one program per group stores its statistics
    shift, mean, rstd = _group_stats(part_ptr, x_ptr, stats_ptr, rstd_ptr, b * G + c // Cg, P,
                                     (b * sxb + (c // Cg) * Cg * sxc) * VEC, eps, first, BLOCK_P)
    front, from_x, t_src = _source_frame(tp, KT, HAS_CACHE)
    nc_frame = tp - (Tp - KT)
    for i in range(ITERS):
        idx = (chunk * ITERS * BLOCK + i * BLOCK).to(tl.int32) + tl.arange(0, BLOCK)
        mask = idx < HW
        x_mask = tl.where(from_x, mask, False)
        v = tl.load(x_ptr + (b * sxb + c * sxc + t_src * sxt) * VEC + idx, mask=x_mask, other=0.0)
        zs = 0.0
        zb = 0.0
        if HAS_ZQ:
            zs = tl.load(zs_ptr + (b * ssb + c * ssc + t_src * sst) * VEC + idx, mask=x_mask, other=0.0)
            zb = tl.load(zb_ptr + (b * szb + c * szc + t_src * szt) * VEC + idx, mask=x_mask, other=0.0)
        y = _normalize(v.to(tl.float32), shift, mean, rstd)
        val = cast_rtne(_gn_activation(y, w_ptr, b_ptr, zs, zb, c, HAS_W, HAS_B, HAS_ZQ, SILU),
                        out_ptr.dtype.element_ty)
        if HAS_CACHE:
            c_ptrs = cache_ptr + (b * scb + c * scc + tl.minimum(tp, KT - 1) * sct) * VEC + idx
            val = tl.where(front, tl.load(c_ptrs, mask=tl.where(front, mask, False), other=0.0), val)
        tl.store(out_ptr + plane * HW + idx, val, mask=mask)
        tl.store(nc_ptr + (bc * KT + nc_frame) * HW + idx, val, mask=tl.where(nc_frame >= 0, mask, False))


@triton.jit
def _gn_fused_fwd_kernel(x_ptr, cache_ptr, zs_ptr, zb_ptr, w_ptr, b_ptr, stats_ptr, rstd_ptr, out_ptr, nc_ptr,
                         C, G, T, KT, Tp, HWV, eps, sxb, sxc, sxt, scb, scc, sct, ssb, ssc, sst, szb, szc, szt,
                         HAS_CACHE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ZQ: tl.constexpr,
                         SILU: tl.constexpr, VEC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
                         BLOCK_KT: tl.constexpr, BLOCK_HW: tl.constexpr):
    """A (b, group) chunk that fits one program (no spatial padding, contiguous frames): the whole group is one
    (BLOCK_C, BLOCK_T, BLOCK_HW) block of (channel, frame, element) held in registers, so x is read once, the
    statistics are two-pass in registers (no partials), and out / new_cache are written once."""
    pid = tl.program_id(0).to(tl.int64)                    # b * G + g
    b = pid // G
    g = pid % G
    Cg = C // G
    HW = HWV * VEC
    cl = tl.arange(0, BLOCK_C)[:, None, None]
    hw = tl.arange(0, BLOCK_HW)[None, None, :]
    c = g * Cg + cl                                        # (BLOCK_C, 1, 1) channels, int64
    bc = b * C + c
    in_c = (cl < Cg) & (hw < HW)
    if HAS_CACHE:                                          # front frames: the cache, copied as is
        j = tl.arange(0, BLOCK_KT)[None, :, None]
        cmask = in_c & (j < KT)
        val = tl.load(cache_ptr + (b * scb + c * scc + j * sct) * VEC + hw, mask=cmask, other=0.0)
        tl.store(out_ptr + (bc * Tp + j) * HW + hw, val, mask=cmask)
        tl.store(nc_ptr + (bc * KT + j - T) * HW + hw, val, mask=cmask & (j >= T))
    t = tl.arange(0, BLOCK_T)[None, :, None]
    mask = in_c & (t < T)
    v = tl.load(x_ptr + (b * sxb + c * sxc + t * sxt) * VEC + hw, mask=mask, other=0.0).to(tl.float32)
    zs = 0.0
    zb = 0.0
    if HAS_ZQ:
        zs = tl.load(zs_ptr + (b * ssb + c * ssc + t * sst) * VEC + hw, mask=mask, other=0.0)
        zb = tl.load(zb_ptr + (b * szb + c * szc + t * szt) * VEC + hw, mask=mask, other=0.0)
    shift = tl.load(x_ptr + (b * sxb + g * Cg * sxc) * VEC).to(tl.float32)
    n = (Cg * T * HW).to(tl.float32)
    d = tl.where(mask, v - shift, 0.0)
    mean = tl.sum(d) / n
    dc = tl.where(mask, d - mean, 0.0)
    rstd = 1.0 / tl.sqrt((tl.sum(dc * dc) / n + eps).to(tl.float32))
    tl.store(stats_ptr + pid * 2, shift)
    tl.store(stats_ptr + pid * 2 + 1, mean)
    tl.store(rstd_ptr + pid, rstd)
    y = _gn_activation(dc * rstd, w_ptr, b_ptr, zs, zb, tl.minimum(c, C - 1), HAS_W, HAS_B, HAS_ZQ, SILU)
    val = cast_rtne(y, out_ptr.dtype.element_ty)
    tl.store(out_ptr + (bc * Tp + t + KT) * HW + hw, val, mask=mask)
    tl.store(nc_ptr + (bc * KT + t + KT - T) * HW + hw, val, mask=mask & (t + KT - T >= 0))
    if not HAS_CACHE:                                      # front frames: the normalized frame 0
        first = mask & (t == 0)
        shape: tl.constexpr = (BLOCK_C, BLOCK_T, BLOCK_HW)   # frame 0's values, stored from the whole block
        for j in range(0, KT):
            tl.store(tl.broadcast_to(out_ptr + (bc * Tp + j) * HW + hw, shape), val, mask=first)
            tl.store(tl.broadcast_to(nc_ptr + (bc * KT + j - T) * HW + hw, shape), val,
                     mask=tl.where(j >= T, first, False))


@triton.jit
def _gather_dy(dout_ptr, dnc_ptr, bc, t, pos, ipos, mask, T, HW, KT, Tp, HWo,
               HAS_CACHE: tl.constexpr, HAS_DNC: tl.constexpr):
    """dL/dh for frame t of the chunk (fp32): the sum over every output element that was copied from it. pos: the
    elements' offsets in a padded output frame (HWo elements), ipos: in an unpadded frame (HW elements)."""
    dy = tl.load(dout_ptr + (bc * Tp + t + KT) * HWo + pos, mask=mask, other=0.0).to(tl.float32)
    if HAS_DNC:
        f = t + KT - T                                     # its padded frame is among new_cache's frames
        dy += tl.load(dnc_ptr + (bc * KT + f) * HW + ipos, mask=tl.where(f >= 0, mask, False),
                      other=0.0).to(tl.float32)
    if not HAS_CACHE:                                      # frame 0 was also copied into the KT front frames
        n_front = tl.where(t == 0, KT, 0)
        for j in range(0, n_front):
            dy += tl.load(dout_ptr + (bc * Tp + j) * HWo + pos, mask=mask, other=0.0).to(tl.float32)
            if HAS_DNC:
                dy += tl.load(dnc_ptr + (bc * KT + j - T) * HW + ipos,
                              mask=tl.where(j >= T, mask, False), other=0.0).to(tl.float32)
    return dy


@triton.jit
def _gn_bwd_kernel(dout_ptr, dnc_ptr, x_ptr, zs_ptr, zb_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr,
                   dzs_ptr, dzb_ptr, part_ptr, dw_ptr, db_ptr, dx_ptr,
                   B, C, G, T, W, HWV, KT, PH, PW, Tp, Wo, HWoV, n_chunks,
                   sxb, sxc, sxt, sxh, ssb, ssc, sst, ssh, szb, szc, szt, szh,
                   DX: tl.constexpr, HAS_CACHE: tl.constexpr, HAS_DNC: tl.constexpr, HAS_W: tl.constexpr,
                   HAS_B: tl.constexpr, HAS_ZQ: tl.constexpr, SILU: tl.constexpr, FLAT: tl.constexpr,
                   VEC: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_P: tl.constexpr):
    """DX = 0: store dzq_scale, dzq_shift and this program's partial sums of da and da * xhat into part
    (B, C, T x n_chunks, 2).
    DX = 1: merge the group's partials into c1, c2 = the group means of dxhat and dxhat * xhat, store dx; the
    program at (b, t, chunk) = 0 of each channel also stores dweight and dbias.
    FLAT (no spatial padding, contiguous frames): every offset is the element index, sizes and strides arrive
    divided by VEC; else rows and columns are recovered per element."""
    pid, chunk, bct, b, c, t = _frame_chunk(n_chunks, C, T)
    bc = bct // T
    HW = HWV * VEC
    HWo = HWoV * VEC
    Cg = C // G
    grp = b * G + c // Cg
    shift, mean_d, rstd = tl.load(mean_ptr + grp * 2), tl.load(mean_ptr + grp * 2 + 1), tl.load(rstd_ptr + grp)
    w_c = tl.load(w_ptr + c).to(tl.float32) if HAS_W else 1.0
    b_c = tl.load(b_ptr + c).to(tl.float32) if HAS_B else 0.0
    c1 = 0.0
    c2 = 0.0
    if DX:
        # every program of the group merges the same Cg x T x n_chunks partials in the same order (deterministic,
        # the same bits everywhere): 12 KB a program from L2 at the VAE's 480 x 720 chunk, against 64 KB of x, dout
        # and zq it streams
        TN = T * n_chunks
        c0 = (c // Cg) * Cg
        cl = tl.arange(0, BLOCK_C)[:, None]
        acc1 = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        rows = part_ptr + (b * C + c0 + cl) * TN * 2                         # (BLOCK_C, 1)
        for start in range(0, TN, BLOCK_P):
            k = start + tl.arange(0, BLOCK_P)[None, :]
            m = (cl < Cg) & (k < TN)
            acc1 += tl.load(rows + k * 2, mask=m, other=0.0)
            acc2 += tl.load(rows + k * 2 + 1, mask=m, other=0.0)
        w_g = tl.load(w_ptr + tl.minimum(c0 + cl, C - 1)).to(tl.float32) if HAS_W else 1.0   # (BLOCK_C, 1)
        n = (Cg * T * HW).to(tl.float32)
        c1 = tl.sum(acc1 * w_g) / n
        c2 = tl.sum(acc2 * w_g) / n
        if (b == 0) & (t == 0) & (chunk == 0):             # one program per channel: the sums over b, t, chunks
            s_da = tl.zeros([BLOCK_P], dtype=tl.float32)
            s_dax = tl.zeros([BLOCK_P], dtype=tl.float32)
            for bb in range(0, B):
                row = part_ptr + (bb * C + c) * TN * 2
                for start in range(0, TN, BLOCK_P):
                    k = start + tl.arange(0, BLOCK_P)
                    s_da += tl.load(row + k * 2, mask=k < TN, other=0.0)
                    s_dax += tl.load(row + k * 2 + 1, mask=k < TN, other=0.0)
            if HAS_W:
                tl.store(dw_ptr + c, cast_rtne(tl.sum(s_dax), dw_ptr.dtype.element_ty))
            if HAS_B:
                tl.store(db_ptr + c, cast_rtne(tl.sum(s_da), db_ptr.dtype.element_ty))
    acc_da = tl.zeros([BLOCK], dtype=tl.float32)
    acc_dax = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ITERS):
        idx = (chunk * ITERS * BLOCK + i * BLOCK).to(tl.int32) + tl.arange(0, BLOCK)
        mask = idx < HW
        if FLAT:
            pos = idx
        else:
            pos = (idx // W + PH) * Wo + idx % W + PW
        dm = _gather_dy(dout_ptr, dnc_ptr, bc, t, pos, idx, mask, T, HW, KT, Tp, HWo, HAS_CACHE, HAS_DNC)
        v = tl.load(x_ptr + (b * sxb + c * sxc + t * sxt) * VEC + _frame_offsets(idx, W, sxh * VEC, FLAT),
                    mask=mask, other=0.0).to(tl.float32)
        xhat = _normalize(v, shift, mean_d, rstd)
        a = xhat * w_c + b_c                               # affine output
        if HAS_ZQ:
            zs = tl.load(zs_ptr + (b * ssb + c * ssc + t * sst) * VEC + _frame_offsets(idx, W, ssh * VEC, FLAT),
                         mask=mask, other=0.0).to(tl.float32)
            m = a * zs + tl.load(zb_ptr + (b * szb + c * szc + t * szt) * VEC
                                 + _frame_offsets(idx, W, szh * VEC, FLAT), mask=mask, other=0.0).to(tl.float32)
        else:
            m = a                                          # modulated
        if SILU:
            s = 1.0 / (1.0 + tl.exp(-m))
            dm = dm * s * (1.0 + m * (1.0 - s))
        da = dm * zs if HAS_ZQ else dm
        if DX:
            dx = rstd * (da * w_c - c1 - xhat * c2)
            tl.store(dx_ptr + bct * HW + idx, cast_rtne(dx, dx_ptr.dtype.element_ty), mask=mask)
        else:
            if HAS_ZQ:
                tl.store(dzs_ptr + bct * HW + idx, cast_rtne(dm * a, dzs_ptr.dtype.element_ty), mask=mask)
                tl.store(dzb_ptr + bct * HW + idx, cast_rtne(dm, dzb_ptr.dtype.element_ty), mask=mask)
            acc_da += tl.where(mask, da, 0.0)
            acc_dax += tl.where(mask, da * xhat, 0.0)
    if not DX:
        tl.store(part_ptr + pid * 2, tl.sum(acc_da))
        tl.store(part_ptr + pid * 2 + 1, tl.sum(acc_dax))


@triton.jit
def _gn_fused_bwd_kernel(dout_ptr, dnc_ptr, x_ptr, zs_ptr, zb_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr,
                         dzs_ptr, dzb_ptr, dw_ptr, db_ptr, dx_ptr, dc_ptr, B, C, G, T, KT, Tp, HWV,
                         sxb, sxc, sxt, ssb, ssc, sst, szb, szc, szt,
                         HAS_CACHE: tl.constexpr, HAS_DNC: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                         HAS_ZQ: tl.constexpr, SILU: tl.constexpr, VEC: tl.constexpr, BLOCK_C: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_KT: tl.constexpr, BLOCK_HW: tl.constexpr):
    """One program per group g, its (b, g) chunks one after another (no spatial padding, contiguous frames): each
    chunk is one (BLOCK_C, BLOCK_T, BLOCK_HW) block in registers, so dout, x and zq are read once, the group means
    of dxhat and dxhat * xhat come from registers, and dweight / dbias are summed over b in this program (fixed
    order, no partials). dcache (with a cache) is gathered here too."""
    g = tl.program_id(0).to(tl.int64)
    Cg = C // G
    HW = HWV * VEC
    cl = tl.arange(0, BLOCK_C)[:, None, None]
    t = tl.arange(0, BLOCK_T)[None, :, None]
    hw = tl.arange(0, BLOCK_HW)[None, None, :]
    c = g * Cg + cl                                        # (BLOCK_C, 1, 1) channels, int64
    mask = (cl < Cg) & (t < T) & (hw < HW)
    w_c = tl.load(w_ptr + tl.minimum(c, C - 1)).to(tl.float32) if HAS_W else 1.0
    b_c = tl.load(b_ptr + tl.minimum(c, C - 1)).to(tl.float32) if HAS_B else 0.0
    acc_da = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_dax = tl.zeros([BLOCK_C], dtype=tl.float32)
    n = (Cg * T * HW).to(tl.float32)
    for b in range(0, B):
        bc = b * C + c
        grp = b * G + g
        shift, mean_d, rstd = tl.load(mean_ptr + grp * 2), tl.load(mean_ptr + grp * 2 + 1), tl.load(rstd_ptr + grp)
        dy = tl.load(dout_ptr + (bc * Tp + t + KT) * HW + hw, mask=mask, other=0.0).to(tl.float32)
        if HAS_DNC:                                        # frames among new_cache's
            dy += tl.load(dnc_ptr + (bc * KT + t + KT - T) * HW + hw, mask=mask & (t + KT - T >= 0),
                          other=0.0).to(tl.float32)
        if not HAS_CACHE:                                  # frame 0 was also copied into the KT front frames
            first = mask & (t == 0)
            shape: tl.constexpr = (BLOCK_C, BLOCK_T, BLOCK_HW)   # loaded into frame 0's rows of the block
            for j in range(0, KT):
                dy += tl.load(tl.broadcast_to(dout_ptr + (bc * Tp + j) * HW + hw, shape), mask=first,
                              other=0.0).to(tl.float32)
                if HAS_DNC:
                    dy += tl.load(tl.broadcast_to(dnc_ptr + (bc * KT + j - T) * HW + hw, shape),
                                  mask=tl.where(j >= T, first, False), other=0.0).to(tl.float32)
        v = tl.load(x_ptr + (b * sxb + c * sxc + t * sxt) * VEC + hw, mask=mask, other=0.0).to(tl.float32)
        xhat = _normalize(v, shift, mean_d, rstd)
        a = xhat * w_c + b_c
        if HAS_ZQ:
            zs = tl.load(zs_ptr + (b * ssb + c * ssc + t * sst) * VEC + hw, mask=mask, other=0.0).to(tl.float32)
            m = a * zs + tl.load(zb_ptr + (b * szb + c * szc + t * szt) * VEC + hw, mask=mask,
                                 other=0.0).to(tl.float32)
        else:
            m = a
        if SILU:
            s = 1.0 / (1.0 + tl.exp(-m))
            dm = dy * s * (1.0 + m * (1.0 - s))
        else:
            dm = dy
        out_off = (bc * T + t) * HW + hw                   # dx, dzq: contiguous (B, C, T, H, W)
        if HAS_ZQ:
            tl.store(dzs_ptr + out_off, cast_rtne(dm * a, dzs_ptr.dtype.element_ty), mask=mask)
            tl.store(dzb_ptr + out_off, cast_rtne(dm, dzb_ptr.dtype.element_ty), mask=mask)
            da = tl.where(mask, dm * zs, 0.0)
        else:
            da = tl.where(mask, dm, 0.0)
        dxhat = da * w_c
        c1 = tl.sum(dxhat) / n
        c2 = tl.sum(dxhat * xhat) / n
        tl.store(dx_ptr + out_off, cast_rtne(rstd * (dxhat - c1 - xhat * c2), dx_ptr.dtype.element_ty), mask=mask)
        acc_da += tl.sum(tl.sum(da, 2), 1)
        acc_dax += tl.sum(tl.sum(da * xhat, 2), 1)
        if HAS_CACHE:                                      # dcache: out's front frames and new_cache's share
            j = tl.arange(0, BLOCK_KT)[None, :, None]
            cmask = (cl < Cg) & (j < KT) & (hw < HW)
            dcv = tl.load(dout_ptr + (bc * Tp + j) * HW + hw, mask=cmask, other=0.0).to(tl.float32)
            if HAS_DNC:
                dcv += tl.load(dnc_ptr + (bc * KT + j - T) * HW + hw, mask=cmask & (j >= T), other=0.0).to(tl.float32)
            tl.store(dc_ptr + (bc * KT + j) * HW + hw, cast_rtne(dcv, dc_ptr.dtype.element_ty), mask=cmask)
    ch = g * Cg + tl.arange(0, BLOCK_C)
    if HAS_W:
        tl.store(dw_ptr + ch, cast_rtne(acc_dax, dw_ptr.dtype.element_ty), mask=ch < (g + 1) * Cg)
    if HAS_B:
        tl.store(db_ptr + ch, cast_rtne(acc_da, db_ptr.dtype.element_ty), mask=ch < (g + 1) * Cg)


STATS_BLOCK, STATS_WARPS = 2048, 8   # 8 elements (one 16-byte bf16 vector) a thread; 39 registers on sm_90
BWD_BLOCK, BWD_WARPS = 1024, 4       # 8 a thread too; four inputs and the fp32 terms in flight stay spill-free
# the single-program path: a (b, group) chunk of at most FUSED_MAX elements (after rounding channels, frames and
# the frame size up to powers of two) in one program of up to FUSED_WARPS warps, FUSED_PER_WARP elements a warp
FUSED_MAX, FUSED_WARPS, FUSED_PER_WARP = 8192, 8, 1024


def _chunking(hw: int, block_max: int = STATS_BLOCK, warps: int = STATS_WARPS):
    """(BLOCK, ITERS, n_chunks, num_warps) for the kernels that walk (b, c, t) frames: up to 8 x BLOCK elements
    a program."""
    block = min(block_max, triton.next_power_of_2(max(hw, 1)))
    iters = min(8, triton.cdiv(hw, block))
    return block, iters, triton.cdiv(hw, block * iters), warps if block == block_max else 4


def _strides4(t):
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _div(strides, vec):
    return tuple(s // vec for s in strides)


def fused_blocks(Cg: int, T: int, kt: int, hw: int):
    """(BLOCK_C, BLOCK_T, BLOCK_KT, BLOCK_HW, num_warps) of the single-program kernels for a (b, group) chunk of Cg
    channels x T frames x hw elements (kt cache frames), or None where the padded block exceeds FUSED_MAX."""
    blocks = [triton.next_power_of_2(max(n, 1)) for n in (Cg, T, kt, hw)]
    size = blocks[0] * max(blocks[1], blocks[2]) * blocks[3]
    if size > FUSED_MAX:
        return None
    return (*blocks, max(1, min(FUSED_WARPS, size // FUSED_PER_WARP)))


def group_norm_silu_pad_fwd(x, num_groups, weight, bias, eps, kernel_t, cache, pad_h, pad_w, zq_scale, zq_shift,
                            silu):
    """-> out, new_cache, stats (B, G, 2) fp32 = (shift, mean - shift), rstd (B, G) fp32."""
    x, cache, zq_scale, zq_shift = _frames(x=x, cache=cache, zq_scale=zq_scale, zq_shift=zq_shift)
    weight, bias = last_dim_contiguous(weight), last_dim_contiguous(bias)   # (C,): indexed by channel
    B, C, T, H, W = x.shape
    G, kt = num_groups, kernel_t - 1
    Tp, Ho, Wo = T + kt, H + 2 * pad_h, W + 2 * pad_w
    out = x.new_empty(B, C, Tp, Ho, Wo)
    new_cache = x.new_empty(B, C, kt, H, W)
    stats = x.new_empty(B, G, 2, dtype=torch.float32)
    rstd = x.new_empty(B, G, dtype=torch.float32)
    if x.numel() == 0:
        return out, new_cache, stats, rstd
    c, zs, zb = (cache if cache is not None else x), (zq_scale if zq_scale is not None else x), \
        (zq_shift if zq_shift is not None else x)
    item = x.element_size()
    flags = dict(HAS_CACHE=int(cache is not None), HAS_W=int(weight is not None), HAS_B=int(bias is not None),
                 HAS_ZQ=int(zq_scale is not None), SILU=int(silu))
    wb = (x if weight is None else weight, x if bias is None else bias)
    flat = pad_h == pad_w == 0 and flat_frames(x, c, zs, zb)
    if flat:
        vec = vec_width(item, H * W, *(s for t in (x, c, zs, zb) for s in _strides4(t)[:3]))
        strides = tuple(s // vec for t in (x, c, zs, zb) for s in _strides4(t)[:3])
        fused = fused_blocks(C // G, T, kt, H * W)
        if fused is not None:                              # one launch: the chunk stays in registers
            bc_, bt, bkt, bhw, warps = fused
            _gn_fused_fwd_kernel[(B * G,)](x, c, zs, zb, *wb, stats, rstd, out, new_cache, C, G, T, kt, Tp,
                                           H * W // vec, eps, *strides, **flags, VEC=vec, BLOCK_C=bc_, BLOCK_T=bt,
                                           BLOCK_KT=bkt, BLOCK_HW=bhw, num_warps=warps)
            return out, new_cache, stats, rstd
    flat_x = flat_frames(x)
    vec_x = vec_width(item, H * W, *_strides4(x)[:3]) if flat_x else 1
    block, iters, n_chunks, warps = _chunking(H * W)
    n_prog = check_grid((B * C * T * n_chunks,))[0]
    parts = x.new_empty(n_prog, 3, dtype=torch.float32)
    _gn_stats_kernel[(n_prog,)](x, parts, C, C // G, T, W, H * W // vec_x, n_chunks, *_div(_strides4(x), vec_x),
                                FLAT=int(flat_x), VEC=vec_x, BLOCK=block, ITERS=iters, num_warps=warps)
    P = n_prog // (B * G)                                  # partials per group, contiguous
    block_p = min(COMBINE_BLOCK, triton.next_power_of_2(P))
    params = (x, c, zs, zb, *wb, parts, stats, rstd, out, new_cache)
    if flat:
        block, iters, n_chunks, warps = _chunking(H * W, FLAT_BLOCK, 8)
        grid = check_grid((B * C * Tp * n_chunks,))
        _gn_apply_flat_kernel[grid](*params, C, G, kt, Tp, n_chunks, H * W // vec, P, eps, *strides, **flags,
                                    VEC=vec, BLOCK=block, ITERS=iters, BLOCK_P=block_p, num_warps=warps)
        return out, new_cache, stats, rstd
    block_h, block_w, warps = _tile(Ho, Wo)
    n_hb, grid = _grid(B * C * Tp, Ho, Wo, block_h, block_w)
    _gn_apply_kernel[grid](
        *params, C, G, T, H, W, kt, pad_h, pad_w, Tp, Ho, Wo, n_hb, P, eps, *_strides4(x), *_strides4(c),
        *_strides4(zs), *_strides4(zb), **flags, BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_P=block_p,
        num_warps=warps)
    return out, new_cache, stats, rstd


def group_norm_silu_pad_bwd(dout, dnc, x, weight, bias, zq_scale, zq_shift, mean, rstd, num_groups, kernel_t,
                            has_cache, pad_h, pad_w, silu):
    """mean: the forward's stats (B, G, 2) = (shift, mean - shift)."""
    x, zq_scale, zq_shift = _frames(x=x, zq_scale=zq_scale, zq_shift=zq_shift)
    weight, bias = last_dim_contiguous(weight), last_dim_contiguous(bias)
    mean, rstd = mean.contiguous(), rstd.contiguous()    # (B, G, 2), (B, G), indexed by group
    dout = dout.contiguous()
    dnc = None if dnc is None or dnc.numel() == 0 else dnc.contiguous()
    _check_frame_span("grad", dout)
    B, C, T, H, W = x.shape
    G, kt = num_groups, kernel_t - 1
    Tp, Ho, Wo = T + kt, H + 2 * pad_h, W + 2 * pad_w
    empty = x.new_empty                                    # a fresh empty tensor for each absent input: no aliasing
    has_zq = zq_scale is not None
    dzs = torch.empty_like(x, memory_format=torch.contiguous_format) if has_zq else empty(0)
    dzb = torch.empty_like(x, memory_format=torch.contiguous_format) if has_zq else empty(0)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    dweight = torch.empty_like(weight) if weight is not None else empty(0)
    dbias = torch.empty_like(bias) if bias is not None else empty(0)
    zs = zq_scale if has_zq else x
    zb = zq_shift if has_zq else x
    flat = pad_h == pad_w == 0 and flat_frames(x, zs, zb)
    vec = vec_width(x.element_size(), H * W, *(s for t in (x, zs, zb) for s in _strides4(t)[:3])) if flat else 1
    args = (dout, dout if dnc is None else dnc, x, zs, zb, x if weight is None else weight,
            x if bias is None else bias, mean, rstd)
    flags = dict(HAS_CACHE=int(has_cache), HAS_DNC=int(dnc is not None), HAS_W=int(weight is not None),
                 HAS_B=int(bias is not None), HAS_ZQ=int(has_zq), SILU=int(silu), VEC=vec)
    grads = (dzs if has_zq else x, dzb if has_zq else x, dweight if weight is not None else x,
             dbias if bias is not None else x)
    fused = fused_blocks(C // G, T, kt, H * W) if flat else None
    if fused is not None:                                  # one pass: each (b, g) chunk stays in registers
        dcache = x.new_empty(B, C, kt, H, W) if has_cache else empty(0)
        bc_, bt, bkt, bhw, warps = fused
        _gn_fused_bwd_kernel[(G,)](*args, *grads, dx, dcache if has_cache else x, B, C, G, T, kt, Tp,
                                   H * W // vec, *(s // vec for t in (x, zs, zb) for s in _strides4(t)[:3]),
                                   **flags, BLOCK_C=bc_, BLOCK_T=bt, BLOCK_KT=bkt, BLOCK_HW=bhw, num_warps=warps)
        return dx, dweight, dbias, dzs, dzb, dcache
    dcache = causal_pad3d_bwd(dout, dnc, T, kernel_t, pad_h, pad_w, "first", True, need_dx=False)[1] \
        if has_cache else empty(0)
    block, iters, n_chunks, warps = _chunking(H * W, BWD_BLOCK, BWD_WARPS)
    n_prog = check_grid((B * C * T * n_chunks,))[0]
    parts = x.new_empty(B, C, T * n_chunks, 2, dtype=torch.float32)
    shape_args = (B, C, G, T, W, H * W // vec, kt, pad_h, pad_w, Tp, Wo, Ho * Wo // vec, n_chunks,
                  *_div(_strides4(x), vec), *_div(_strides4(zs), vec), *_div(_strides4(zb), vec))
    block_c = triton.next_power_of_2(C // G)
    # the second pass's merge of the partials: (BLOCK_C, BLOCK_P) blocks of 1024, 8 a thread at 4 warps
    block_p = min(max(COMBINE_BLOCK // block_c, 1), triton.next_power_of_2(T * n_chunks))
    flags.update(FLAT=int(flat), BLOCK=block, ITERS=iters, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=warps)
    _gn_bwd_kernel[(n_prog,)](*args, grads[0], grads[1], parts, x, x, x, *shape_args, DX=0, **flags)
    _gn_bwd_kernel[(n_prog,)](*args, x, x, parts, grads[2], grads[3], dx, *shape_args, DX=1, **flags)
    return dx, dweight, dbias, dzs, dzb, dcache


@torch.library.custom_op("cogvideox::group_norm_silu_pad", mutates_args=())
def _group_norm_silu_pad_op(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor],
                            bias: Optional[torch.Tensor], eps: float, kernel_t: int, cache: Optional[torch.Tensor],
                            pad_h: int, pad_w: int, zq_scale: Optional[torch.Tensor], zq_shift: Optional[torch.Tensor],
                            silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out, new_cache, stats, rstd), saved for the backward: stats (B, G, 2) = (shift, mean - shift),
    rstd (B, G), fp32."""
    if use_triton(x):
        return group_norm_silu_pad_fwd(x, num_groups, weight, bias, eps, kernel_t, cache, pad_h, pad_w, zq_scale,
                                       zq_shift, silu)
    out, new_cache = group_norm_silu_pad_ref(x, num_groups, weight, bias, eps, kernel_t, cache, (pad_h, pad_w),
                                             zq_scale, zq_shift, silu)
    return (out, new_cache) + _group_stats_ref(x, num_groups, eps)


@_group_norm_silu_pad_op.register_fake
def _(x, num_groups, weight, bias, eps, kernel_t, cache, pad_h, pad_w, zq_scale, zq_shift, silu):
    B, C, T, H, W = x.shape
    kt = kernel_t - 1
    return (x.new_empty(B, C, T + kt, H + 2 * pad_h, W + 2 * pad_w), x.new_empty(B, C, kt, H, W),
            x.new_empty(B, num_groups, 2, dtype=torch.float32), x.new_empty(B, num_groups, dtype=torch.float32))


@torch.library.custom_op("cogvideox::group_norm_silu_pad_bwd", mutates_args=())
def _group_norm_silu_pad_bwd_op(dout: torch.Tensor, dnc: Optional[torch.Tensor], x: torch.Tensor,
                                weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                                zq_scale: Optional[torch.Tensor], zq_shift: Optional[torch.Tensor],
                                mean: torch.Tensor, rstd: torch.Tensor, num_groups: int, kernel_t: int,
                                has_cache: bool, pad_h: int, pad_w: int, silu: bool) -> list[torch.Tensor]:
    """(dx, dweight, dbias, dzq_scale, dzq_shift, dcache); an empty tensor for each absent input."""
    fn = group_norm_silu_pad_bwd if use_triton(x) else group_norm_silu_pad_bwd_ref
    return list(fn(dout, dnc, x, weight, bias, zq_scale, zq_shift, mean, rstd, num_groups, kernel_t, has_cache,
                   pad_h, pad_w, silu))


@_group_norm_silu_pad_bwd_op.register_fake
def _(dout, dnc, x, weight, bias, zq_scale, zq_shift, mean, rstd, num_groups, kernel_t, has_cache, pad_h, pad_w,
      silu):
    B, C, T, H, W = x.shape

    def like_x(t):
        return x.new_empty(0) if t is None else torch.empty_like(x, memory_format=torch.contiguous_format)

    return [like_x(x), x.new_empty(0) if weight is None else torch.empty_like(weight),
            x.new_empty(0) if bias is None else torch.empty_like(bias), like_x(zq_scale), like_x(zq_shift),
            x.new_empty(B, C, kernel_t - 1, H, W) if has_cache else x.new_empty(0)]


def _setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, eps, kernel_t, cache, pad_h, pad_w, zq_scale, zq_shift, silu = inputs
    out, new_cache, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, zq_scale, zq_shift, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.args = (num_groups, kernel_t, cache is not None, pad_h, pad_w, silu)


def _backward(ctx, dout, dnc, _dmean, _drstd):
    x, weight, bias, zq_scale, zq_shift, mean, rstd = ctx.saved_tensors
    num_groups, kernel_t, has_cache, pad_h, pad_w, silu = ctx.args
    dx, dw, db, dzs, dzb, dcache = _group_norm_silu_pad_bwd_op(
        dout.contiguous(), None if dnc is None else dnc.contiguous(), x, weight, bias, zq_scale, zq_shift, mean, rstd,
        num_groups, kernel_t, has_cache, pad_h, pad_w, silu)
    opt = lambda t, g: g if t is not None else None  # noqa: E731
    return (dx, None, opt(weight, dw), opt(bias, db), None, None, dcache if has_cache else None, None, None,
            opt(zq_scale, dzs), opt(zq_shift, dzb), None)


_group_norm_silu_pad_op.register_autograd(_backward, setup_context=_setup_context)


def group_norm_silu_pad(x, num_groups, weight=None, bias=None, eps=1e-6, kernel_t=3, cache=None, pad_hw=(1, 1),
                        zq_scale=None, zq_shift=None, silu=True):
    """x: (B, C, T, H, W); weight, bias: (C,); zq_scale, zq_shift: (B, C, T, H, W) or None
    -> (out (B, C, T+kernel_t-1, H+2ph, W+2pw), new_cache (B, C, kernel_t-1, H, W))."""
    _check_pad(x, kernel_t, cache, pad_hw, "first")
    if x.numel() == 0:
        raise ValueError(f"x must not be empty (GroupNorm statistics of no elements), got shape {tuple(x.shape)}")
    C = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 or C % num_groups:
        raise ValueError(f"num_groups must be a positive int dividing C={C}, got {num_groups!r}")
    check_params(x, C, weight=weight, bias=bias)
    if (zq_scale is None) != (zq_shift is None):
        raise ValueError("zq_scale and zq_shift must be given together")
    for name, p in (("zq_scale", zq_scale), ("zq_shift", zq_shift)):
        if p is not None:
            check_tensor(name, p, ndim=5)
            check_like(name, p, "x", x)
            check_shape(name, p, tuple(x.shape))
    if not isinstance(silu, bool):
        raise TypeError(f"silu must be a bool, got {type(silu).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    pad_h, pad_w = pad_hw
    out, new_cache, _, _ = _group_norm_silu_pad_op(x, num_groups, weight, bias, float(eps), kernel_t, cache, pad_h,
                                                   pad_w, zq_scale, zq_shift, silu)
    return out, new_cache
