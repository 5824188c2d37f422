"""Expert adaptive LayerNorm, optionally with the gated residual before it (CogVideoX, arXiv 2408.06072 §2.2).

    x_new = x + gate[b, e(s)] * y                                   (expert_adaln_residual only)
    out   = layer_norm(x_new, weight, bias, eps) * (1 + scale[b, e(s)]) + shift[b, e(s)]

x is the joint sequence (B, S, D) = [text | vision]; e(s) = 0 for s < text_len (the text expert), 1 otherwise.
With E = 1 one expert modulates every token. One LayerNorm weight/bias serves both experts.
Under context parallelism x is a shard: rows [offset, offset + S) of the joint sequence, text_len the global text
length, so local row s is text when offset + s < text_len; the shard's text rows are [0, clamp(text_len - offset,
0, S)), computed on the host (local_text_len): the kernels only ever see a local boundary.

Fused: one kernel reads x (and y) once and writes x_new (residual stream) and out once; LayerNorm statistics,
the residual and the modulation stay in registers. x_new is rounded to x.dtype before the LayerNorm, as the
reference (and the unfused model) does. Mean and variance are taken of x - x[0] (the row's first element): an
fp32 mean of raw values like 12345.678 is off by ~1e-3, which a constant row's rstd = 1/sqrt(eps) would turn into
outputs of ~0.3 instead of torch's exact 0; shifted, such a row is exactly 0 and near-constant rows keep their
precision. The forward also writes the statistics, (B, S) fp32 mean of x - x[0] and rstd (8 bytes a row, as
flash-attention's LayerNorm saves them), so the backward needs one reduction a row (sum(dxhat * xhat) and
sum(dxhat) together), not three; it writes dx (and dy) once. Reductions over tokens (dshift, dscale, dgate per
expert; dweight, dbias) are per-program fp32 partials, summed on the host in a fixed order: deterministic, no
atomics.

Layout: one program owns a block of rows of one batch element and walks it in at most two segments (text rows,
then vision rows), loading the segment's modulation vectors once; each row is one BLOCK_D-wide vector, 8 elements
per thread. Grid (B, programs per sample): the batch on axis 0 (up to 2^31 - 1), the program count, which
launch_config bounds by ~4 (forward) and ~2 (backward) x the SM count whatever S is, on axis 1 (CUDA allows 65535).
Packed (segments=, kernels.Segments: several [text | vision] sequences end to end in one (1, N, D) x, modulation
(n, E, D)): the constexpr VARLEN makes grid row b segment b, rows [cu_seqlens[b], cu_seqlens[b+1]) with text
length seg_text_lens[b], read on the device; the programs are sized for the longest segment and those past the end
of a shorter one write zero partials. The dense (VARLEN = 0) build is the one from before packing, instruction
for instruction (sm_90 PTX of the 5B bf16 kernels compared, debug info aside).

What the sm_90 build does (SASS by cuobjdump of the AOT build at 5B shapes B=2, S=17776, D=3072, bf16, residual;
the PTX-level counts are asserted in tests/test_expert_adaln.py): the row loop is software-pipelined
(tl.range num_stages). Each backward row issues 6 LDGSTS (cp.async into shared memory: x_new, dout, dx_new, y and
the two statistics of the row two ahead), 1 LDG.U16 (the next row's shift x[0], a 2-byte load the pipeliner leaves
in place, loaded one row ahead by hand), then waits at 3 BAR.SYNC (the pipeline's, and one two-value reduction)
and writes 2 STG. Before: LDG x, dout; 8 BAR.SYNC (four reductions); LDG dx_new, y; so every row waited for DRAM
twice. A forward row: 2 LDGSTS, 2 LDG.U16, 4 BAR.SYNC, 4 STG. Registers, no spills: backward 126 at 16 warps (one
program per SM), forward 98; at 2B (D = 1920, 8 warps) <= 128, two programs per SM. Not yet timed on a GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._dispatch import (check_eps, check_grid, check_like, check_offset, check_params, check_shape, check_tensor,
                        check_text_len, last_dim_contiguous, local_text_len, num_sms, use_triton)
from ._triton_common import cast_rtne
from .segments import Segments, check_segments, segment_rows, segment_sum


def expert_rows(p: torch.Tensor, text_len: int, seq_len: int, offset: int = 0) -> torch.Tensor:
    """(B, E, D) per-expert vectors -> (B, S, D) per-token view: expert 0 for text rows, expert 1 for vision.
    offset: the global index of the first row (a context-parallel shard); text_len stays the global text length."""
    B, E, D = p.shape
    if E == 1:
        return p.expand(B, seq_len, D)
    n_text = local_text_len(text_len, seq_len, offset)
    return torch.cat([p[:, :1].expand(B, n_text, D), p[:, 1:].expand(B, seq_len - n_text, D)], dim=1)


def expert_sum(t: torch.Tensor, text_len: int, E: int, offset: int = 0) -> torch.Tensor:
    """(B, S, D) per-token values -> (B, E, D) sums over each expert's tokens (the adjoint of expert_rows)."""
    if E == 1:
        return t.sum(1, keepdim=True)
    n_text = local_text_len(text_len, t.shape[1], offset)
    return torch.stack([t[:, :n_text].sum(1), t[:, n_text:].sum(1)], dim=1)


def _rows(p, text_len, S, offset, segments):
    """Per-token modulation rows: of a (B, S) joint sequence (expert_rows) or of a packed one (segment_rows)."""
    return expert_rows(p, text_len, S, offset) if segments is None else segment_rows(p, segments)


def _sums(t, text_len, E, offset, segments):
    """The adjoint of _rows: per-expert token sums, (B, E, D) (expert_sum) or (n, E, D) (segment_sum)."""
    return expert_sum(t, text_len, E, offset) if segments is None else segment_sum(t, segments, E)


def expert_adaln_ref(x, shift, scale, text_len, weight=None, bias=None, eps=1e-5, offset=0, segments=None):
    """Pure torch, fp32 inside, one rounding to x.dtype at the end. segments: a kernels.Segments, x the packed
    (1, N, D) sequence and shift / scale (n, E, D), one row per segment (text_len is then unused)."""
    B, S, D = x.shape
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    normed = F.layer_norm(x.float(), (D,), w, b, eps)
    out = normed * (1 + _rows(scale.float(), text_len, S, offset, segments))
    out = out + _rows(shift.float(), text_len, S, offset, segments)
    return out.to(x.dtype)


def expert_adaln_residual_ref(x, y, gate, shift, scale, text_len, weight=None, bias=None, eps=1e-5, offset=0,
                              segments=None):
    """x_new = x + gate * y (rounded to x.dtype), then expert_adaln_ref(x_new, ...). segments: as expert_adaln_ref."""
    S = x.shape[1]
    x_new = (x.float() + _rows(gate.float(), text_len, S, offset, segments) * y.float()).to(x.dtype)
    return x_new, expert_adaln_ref(x_new, shift, scale, text_len, weight, bias, eps, offset, segments)


@triton.jit
def _segment(pid, text_len, S, rows_per_prog, e: tl.constexpr, E: tl.constexpr):
    """Rows [lo, hi) of this program's block that expert e modulates (empty when hi <= lo)."""
    lo = pid * rows_per_prog
    hi = tl.minimum(lo + rows_per_prog, S)
    if E == 2:
        if e == 0:
            hi = tl.minimum(hi, text_len)
        else:
            lo = tl.maximum(lo, text_len)
    return lo, hi


# Row addressing, dense or packed. The VARLEN branches are compile-time, and the dense ones are the expressions the
# kernels had inline before packing existed, at the same places: the dense build is unchanged to the instruction.

@triton.jit
def _segment_of(b, S, text_len, CU, SEG_TL, VARLEN: tl.constexpr):
    """-> (S, text_len, base) of grid row b: VARLEN, segment b = packed rows [base, base + S) with its own text
    length; dense, batch element b as given (base unused)."""
    if VARLEN:
        base = tl.load(CU + b).to(tl.int64)
        return (tl.load(CU + b + 1) - base).to(tl.int32), tl.load(SEG_TL + b), base
    else:
        return S, text_len, b


@triton.jit
def _in_off(b, r, s_b, s_s, base, VARLEN: tl.constexpr):
    """Element offset of row r (widened to int64 here) of grid row b in a strided input (x, y)."""
    if VARLEN:
        return (base + tl.cast(r, tl.int64)) * s_s
    else:
        return b * s_b + tl.cast(r, tl.int64) * s_s


@triton.jit
def _row(b, r64, S, base, VARLEN: tl.constexpr):
    """Index of row r64 of grid row b in the contiguous (B, S) / packed (1, N) outputs and statistics."""
    if VARLEN:
        return base + r64
    else:
        return b * S + r64


@triton.jit
def _expert_adaln_fwd_kernel(
    X, Y, XN, OUT, MEAN, RSTD, GATE, SHIFT, SCALE, W, Bias, CU, SEG_TL,
    S, D, text_len, rows_per_prog, eps,
    s_xb, s_xs, s_yb, s_ys, s_gb, s_ge, s_hb, s_he, s_cb, s_ce,
    E: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_D: tl.constexpr, STAGES: tl.constexpr, VARLEN: tl.constexpr,
):
    """MEAN, RSTD: (B, S) fp32, the statistics the backward reads: the mean of x - x[0] and rstd.
    VARLEN: b is segment b of a packed (1, N, D) x (CU: cu_seqlens, SEG_TL: the text lengths; S is then unused)."""
    pid = tl.program_id(1)
    b = tl.program_id(0).to(tl.int64)  # int64 before any stride multiply: B*S*D may exceed 2^31
    eps = tl.cast(eps, tl.float32)  # inductor may pass an fp64 scalar
    S, text_len, base = _segment_of(b, S, text_len, CU, SEG_TL, VARLEN)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    w = tl.load(W + cols, mask=mask, other=1.0).to(tl.float32) if HAS_WEIGHT else 1.0
    bb = tl.load(Bias + cols, mask=mask, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    for e in tl.static_range(E):
        lo, hi = _segment(pid, text_len, S, rows_per_prog, e, E)
        shift = tl.load(SHIFT + b * s_hb + e * s_he + cols, mask=mask, other=0.0).to(tl.float32)
        scale1 = 1.0 + tl.load(SCALE + b * s_cb + e * s_ce + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            gate = tl.load(GATE + b * s_gb + e * s_ge + cols, mask=mask, other=0.0).to(tl.float32)
            gate0 = tl.load(GATE + b * s_gb + e * s_ge).to(tl.float32)
        # The shift (element 0 of the row, of x and y) is a scalar load issued one row ahead by hand: the
        # pipeliner leaves sub-4-byte loads in place, where each would wait an L2 latency of its own.
        x0_next = tl.load(X + _in_off(b, lo, s_xb, s_xs, base, VARLEN), mask=lo < hi, other=0.0)
        if HAS_RESIDUAL:
            y0_next = tl.load(Y + _in_off(b, lo, s_yb, s_ys, base, VARLEN), mask=lo < hi,
                              other=0.0)
        # STAGES > 1: the pipeliner copies the next rows' x (and y) into shared memory while this row reduces
        for r in tl.range(lo, hi, num_stages=STAGES):
            r64 = tl.cast(r, tl.int64)
            x_row = X + _in_off(b, r64, s_xb, s_xs, base, VARLEN)
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            x0 = x0_next.to(tl.float32)
            x0_next = tl.load(x_row + s_xs, mask=r + 1 < hi, other=0.0)
            o_off = _row(b, r64, S, base, VARLEN) * D + cols  # XN and OUT are new contiguous (B, S, D) tensors
            if HAS_RESIDUAL:
                y_row = Y + _in_off(b, r64, s_yb, s_ys, base, VARLEN)
                y = tl.load(y_row + cols, mask=mask, other=0.0).to(tl.float32)
                y0 = y0_next.to(tl.float32)
                y0_next = tl.load(y_row + s_ys, mask=r + 1 < hi, other=0.0)
                xn = cast_rtne(x + gate * y, XN.dtype.element_ty)
                tl.store(XN + o_off, xn, mask=mask)
                x = xn.to(tl.float32)  # normalize the rounded residual stream, as the unfused model does
                # element 0 of x_new by the same arithmetic as lane 0 (so a constant x_new row shifts to exact 0)
                x0 = cast_rtne(x0 + gate0 * y0, XN.dtype.element_ty).to(tl.float32)
            xs = tl.where(mask, x - x0, 0.0)
            mean_s = tl.sum(xs, axis=0) / D
            xc = tl.where(mask, xs - mean_s, 0.0)
            rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / D + eps)
            out = (xc * rstd * w + bb) * scale1 + shift
            tl.store(OUT + o_off, cast_rtne(out, OUT.dtype.element_ty), mask=mask)
            tl.store(MEAN + _row(b, r64, S, base, VARLEN), mean_s)
            tl.store(RSTD + _row(b, r64, S, base, VARLEN), rstd)


@triton.jit
def _add_pair(a0, b0, a1, b1):
    return a0 + a1, b0 + b1


@triton.jit
def _expert_adaln_bwd_kernel(
    DOUT, DXN, X, MEAN, RSTD, Y, GATE, SCALE, W, Bias, DX, DY, PART, CU, SEG_TL,
    S, D, text_len, rows_per_prog,
    s_xb, s_xs, s_yb, s_ys, s_gb, s_ge, s_cb, s_ce,
    E: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_DXN: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr, VARLEN: tl.constexpr,
):
    """X is the LayerNorm input: x (expert_adaln) or the saved x_new (residual); MEAN, RSTD its forward statistics
    (xhat = (x - x[0] - MEAN) * RSTD, the forward's own arithmetic). DOUT, DXN, DX, DY: contiguous.

    PART: (planes, B * P, E, D) fp32 partial sums of this program's rows per expert; planes in order
    dshift, dscale, [dgate], [dweight], [dbias]. Every element is written (zeros for an empty segment, and for
    every program past the end of a short VARLEN segment). VARLEN, CU, SEG_TL: as the forward (B = n segments).
    """
    pid = tl.program_id(1)
    b = tl.program_id(0).to(tl.int64)
    S, text_len, base = _segment_of(b, S, text_len, CU, SEG_TL, VARLEN)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    plane = (tl.num_programs(0) * tl.num_programs(1)).to(tl.int64) * E * D
    part = ((b * tl.num_programs(1) + pid) * E) * D + cols
    PL_W: tl.constexpr = 2 + HAS_RESIDUAL
    PL_B: tl.constexpr = PL_W + HAS_WEIGHT
    w = tl.load(W + cols, mask=mask, other=1.0).to(tl.float32) if HAS_WEIGHT else 1.0
    for e in tl.static_range(E):
        lo, hi = _segment(pid, text_len, S, rows_per_prog, e, E)
        # normed = xhat * w + b, out = normed * scale1 + shift: d(xhat) = dout * (scale1 * w)
        sw = (1.0 + tl.load(SCALE + b * s_cb + e * s_ce + cols, mask=mask, other=0.0).to(tl.float32)) * w
        if HAS_RESIDUAL:
            gate = tl.load(GATE + b * s_gb + e * s_ge + cols, mask=mask, other=0.0).to(tl.float32)
        # Per segment, scale1, w and b are constant vectors, so two token sums give four of the five gradients:
        # dshift = sum(dout), dscale = w * sum(dout*xhat) + b * sum(dout), dweight += scale1 * sum(dout*xhat),
        # dbias += scale1 * sum(dout). Three accumulators instead of five keep the loop in registers.
        acc_do = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_doxh = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_gate = tl.zeros([BLOCK_D], dtype=tl.float32)
        # Every load of a row comes first, and the pipeliner (STAGES > 1) copies the next rows' into shared memory
        # while this one reduces: a barrier cannot be crossed by a load, so loads placed after a reduction would
        # each wait one DRAM latency more.
        x0_next = tl.load(X + _in_off(b, lo, s_xb, s_xs, base, VARLEN), mask=lo < hi,
                          other=0.0)  # as forward
        for r in tl.range(lo, hi, num_stages=STAGES):
            r64 = tl.cast(r, tl.int64)
            g_off = _row(b, r64, S, base, VARLEN) * D + cols
            x_row = X + _in_off(b, r64, s_xb, s_xs, base, VARLEN)
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            x0 = x0_next.to(tl.float32)
            x0_next = tl.load(x_row + s_xs, mask=r + 1 < hi, other=0.0)
            dout = tl.load(DOUT + g_off, mask=mask, other=0.0).to(tl.float32)
            if HAS_DXN:
                dxn = tl.load(DXN + g_off, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                y = tl.load(Y + _in_off(b, r64, s_yb, s_ys, base, VARLEN) + cols, mask=mask, other=0.0).to(tl.float32)
            mean_s = tl.load(MEAN + _row(b, r64, S, base, VARLEN))
            rstd = tl.load(RSTD + _row(b, r64, S, base, VARLEN))
            xhat = tl.where(mask, (x - x0) - mean_s, 0.0) * rstd
            acc_do += dout
            acc_doxh += dout * xhat
            dxhat = dout * sw
            # sum(dxhat * xhat) and sum(dxhat) in one reduction: one round of shuffles and barriers per row
            c1, c2 = tl.reduce((dxhat * xhat, dxhat), 0, _add_pair)
            dx = (dxhat - (xhat * (c1 / D) + c2 / D)) * rstd
            if HAS_DXN:
                dx += dxn
            tl.store(DX + g_off, cast_rtne(dx, DX.dtype.element_ty), mask=mask)
            if HAS_RESIDUAL:
                acc_gate += dx * y
                tl.store(DY + g_off, cast_rtne(dx * gate, DY.dtype.element_ty), mask=mask)
        # scale1 and b re-read here rather than held through the loop (registers)
        scale1 = 1.0 + tl.load(SCALE + b * s_cb + e * s_ce + cols, mask=mask, other=0.0).to(tl.float32)
        bb = tl.load(Bias + cols, mask=mask, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
        p_off = part + e * D
        tl.store(PART + p_off, acc_do, mask=mask)
        tl.store(PART + plane + p_off, acc_doxh * w + acc_do * bb, mask=mask)
        if HAS_RESIDUAL:
            tl.store(PART + 2 * plane + p_off, acc_gate, mask=mask)
        if HAS_WEIGHT:
            tl.store(PART + PL_W * plane + p_off, acc_doxh * scale1, mask=mask)
        if HAS_BIAS:
            tl.store(PART + PL_B * plane + p_off, acc_do * scale1, mask=mask)


PIPELINE_SMEM = 160 * 1024   # of the 227 KB of shared memory a Hopper program may use (the rest: reductions)


def launch_config(B: int, S: int, D: int, n_sm: int, itemsize: int = 2) -> dict:
    """Block size, warps, pipeline stages and rows per program of both kernels for a (B, S, D) problem on n_sm SMs
    with itemsize-byte activations.

    One row is one BLOCK_D vector, 8 elements per thread: 16 warps at BLOCK_D = 4096 (5B), one program per SM at
    the 91-126 registers of the sm_90 build; 8 warps at 2048 (2B), two. Each program walks its rows through a
    software pipeline of STAGES: the loads of the next STAGES - 1 rows are copied into shared memory (cp.async)
    while the current row reduces, so up to 3 rows are in flight, 2 x 24 KB of loads ahead at 5B in bf16 (fp32:
    one row ahead). Fewer stages where the rows would not fit in PIPELINE_SMEM: no pipeline from BLOCK_D = 32768
    in bf16, 16384 in fp32. Long programs amortize the pipeline's fill: forward ~4 programs per SM (68 rows each
    at 2 x 17,776 tokens on 132 SMs), backward ~2, which also keeps its fp32 partials small: at most 5 planes x
    264 programs x E x D x 4 B, 32 MB for 5B (~5% of the backward's traffic).
    """
    block_d = triton.next_power_of_2(D)
    fwd_rows = triton.cdiv(S, max(1, triton.cdiv(4 * n_sm, B)))
    bwd_rows = triton.cdiv(S, max(1, triton.cdiv(2 * n_sm, B)))
    warps = max(1, min(16, block_d // 256))
    # the pipeline holds STAGES - 1 rows of up to 4 vectors (backward: x, dout, dx_new, y) in shared memory
    stages = 3 if itemsize <= 2 else 2
    while stages > 1 and (stages - 1) * 4 * block_d * itemsize > PIPELINE_SMEM:
        stages -= 1
    return dict(BLOCK_D=block_d, fwd_warps=warps, bwd_warps=warps, STAGES=stages,
                fwd_rows=fwd_rows, fwd_progs=triton.cdiv(S, fwd_rows),
                bwd_rows=bwd_rows, bwd_progs=triton.cdiv(S, bwd_rows))


_alloc = torch.empty  # every buffer the kernels fill; the tests swap in a NaN-filled one to catch unwritten elements


def _mod_strides(p):
    return (p.stride(0), p.stride(1)) if p is not None else (0, 0)


def _launch_rows(x, text_len, offset, cu_seqlens, max_len):
    """-> (rows of the grid, S, text_len as the kernel takes them): dense, (B, S) and the shard's local text_len;
    packed, one grid row per segment with programs for the longest (the kernel reads each segment's S and
    text_len from cu_seqlens and seg_text_lens)."""
    B, S, _ = x.shape
    if cu_seqlens is None:
        return B, S, local_text_len(text_len, S, offset)   # the kernel's text_len: text rows of this shard
    return cu_seqlens.shape[0] - 1, max_len, 0


def expert_adaln_fwd(x, y, gate, shift, scale, text_len, weight, bias, eps, offset=0, cu_seqlens=None,
                     seg_text_lens=None, max_len=0):
    """Launch the forward kernel. y, gate None: expert_adaln -> (None, out, mean, rstd); else (x_new, out, mean,
    rstd); mean, rstd: (B, S) fp32 statistics of the LayerNorm input for the backward. cu_seqlens (n + 1,),
    seg_text_lens (n,) int32 and max_len: a packed (1, N, D) x of n segments (VARLEN), modulation (n, E, D)."""
    B, S, D = x.shape
    n_rows, S_arg, text_len = _launch_rows(x, text_len, offset, cu_seqlens, max_len)
    x, y, gate, shift, scale, w, bi = map(last_dim_contiguous, (x, y, gate, shift, scale, weight, bias))
    res = y is not None
    cfg = launch_config(n_rows, S_arg, D, num_sms(x.device), x.element_size())
    out = _alloc((B, S, D), dtype=x.dtype, device=x.device)
    x_new = _alloc((B, S, D), dtype=x.dtype, device=x.device) if res else None
    mean = _alloc((B, S), dtype=torch.float32, device=x.device)
    rstd = _alloc((B, S), dtype=torch.float32, device=x.device)
    _expert_adaln_fwd_kernel[check_grid((n_rows, cfg["fwd_progs"]))](
        x, y, x_new, out, mean, rstd, gate, shift, scale, w, bi, cu_seqlens, seg_text_lens,
        S_arg, D, text_len, cfg["fwd_rows"], eps,
        x.stride(0), x.stride(1), *(_mod_strides(y)), *(_mod_strides(gate)), *(_mod_strides(shift)),
        *(_mod_strides(scale)),
        E=shift.shape[1], HAS_RESIDUAL=int(res), HAS_WEIGHT=int(w is not None), HAS_BIAS=int(bi is not None),
        BLOCK_D=cfg["BLOCK_D"], STAGES=cfg["STAGES"], VARLEN=int(cu_seqlens is not None),
        num_warps=cfg["fwd_warps"],
    )
    return x_new, out, mean, rstd


def expert_adaln_bwd(dout, dx_new, x, mean, rstd, y, gate, scale, text_len, weight, bias, offset=0,
                     cu_seqlens=None, seg_text_lens=None, max_len=0):
    """Launch the backward kernel; x is the LayerNorm input, mean / rstd its forward statistics.
    -> dx, dy, dgate, dshift, dscale, dweight, dbias (None for the ones that do not exist). cu_seqlens,
    seg_text_lens, max_len: as expert_adaln_fwd; the partials are then (planes, n, P, E, D), summed per segment."""
    B, S, D = x.shape
    n_rows, S_arg, text_len = _launch_rows(x, text_len, offset, cu_seqlens, max_len)
    E = scale.shape[1]
    x, y, gate, scale, w, bi = map(last_dim_contiguous, (x, y, gate, scale, weight, bias))
    dout = dout.contiguous()  # incoming grads may be stride-0 expansions (.sum().backward())
    dx_new = dx_new.contiguous() if dx_new is not None else None
    mean, rstd = mean.contiguous(), rstd.contiguous()
    res = y is not None
    cfg = launch_config(n_rows, S_arg, D, num_sms(x.device), x.element_size())
    P = cfg["bwd_progs"]
    planes = 2 + int(res) + int(w is not None) + int(bi is not None)
    part = _alloc((planes, n_rows, P, E, D), dtype=torch.float32, device=x.device)
    dx = _alloc((B, S, D), dtype=x.dtype, device=x.device)
    dy = _alloc((B, S, D), dtype=x.dtype, device=x.device) if res else None
    _expert_adaln_bwd_kernel[check_grid((n_rows, P))](
        dout, dx_new, x, mean, rstd, y, gate, scale, w, bi, dx, dy, part, cu_seqlens, seg_text_lens,
        S_arg, D, text_len, cfg["bwd_rows"],
        x.stride(0), x.stride(1), *(_mod_strides(y)), *(_mod_strides(gate)), *(_mod_strides(scale)),
        E=E, HAS_RESIDUAL=int(res), HAS_DXN=int(dx_new is not None), HAS_WEIGHT=int(w is not None),
        HAS_BIAS=int(bi is not None), BLOCK_D=cfg["BLOCK_D"], STAGES=cfg["STAGES"],
        VARLEN=int(cu_seqlens is not None), num_warps=cfg["bwd_warps"],
    )
    # Fixed-order reductions over the programs (separate tensors: custom-op outputs must not alias).
    planes = iter(part.unbind(0))
    dshift = next(planes).sum(1).to(scale.dtype)
    dscale = next(planes).sum(1).to(scale.dtype)
    dgate = next(planes).sum(1).to(gate.dtype) if res else None
    dweight = next(planes).sum((0, 1, 2)).to(weight.dtype) if w is not None else None
    dbias = next(planes).sum((0, 1, 2)).to(bias.dtype) if bi is not None else None
    return dx, dy, dgate, dshift, dscale, dweight, dbias


def _row_stats(x, eps):
    """The kernels' LayerNorm statistics of x (B, S, D), in torch: the mean of x - x[..., 0] and rstd, (B, S) fp32."""
    xs = x.float() - x[..., :1].float()
    mean = xs.mean(-1)
    xc = xs - mean[..., None]
    return mean, torch.rsqrt((xc * xc).mean(-1) + eps)


def _expert_adaln_bwd_torch(dout, dx_new, x, mean, rstd, y, gate, scale, text_len, weight, bias, offset=0,
                            segments=None):
    """Pure-torch backward (the CPU path), fp32, the same math as the kernel. Written out rather than autograd
    through the reference: custom-op impls run below the autograd dispatch key, so no graph would be recorded.
    segments: a packed x (1, N, D), modulation and its gradients (n, E, D)."""
    B, S, D = x.shape
    E = scale.shape[1]
    xf, dout = x.float(), dout.float()
    rstd = rstd[..., None]
    xhat = ((xf - xf[..., :1]) - mean[..., None]) * rstd                # (B, S, D)
    w = weight.float() if weight is not None else xhat.new_ones(D)
    normed = xhat * w + (bias.float() if bias is not None else 0.0)
    dn = dout * (1 + _rows(scale.float(), text_len, S, offset, segments))  # d(normed)
    dxhat = dn * w
    dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    if dx_new is not None:
        dx = dx + dx_new.float()
    dy = (dx * _rows(gate.float(), text_len, S, offset, segments)).to(y.dtype) if y is not None else None
    dgate = _sums(dx * y.float(), text_len, E, offset, segments).to(gate.dtype) if y is not None else None
    dshift = _sums(dout, text_len, E, offset, segments).to(scale.dtype)
    dscale = _sums(dout * normed, text_len, E, offset, segments).to(scale.dtype)
    dweight = (dn * xhat).sum((0, 1)).to(weight.dtype) if weight is not None else None
    dbias = dn.sum((0, 1)).to(bias.dtype) if bias is not None else None
    return dx.to(x.dtype), dy, dgate, dshift, dscale, dweight, dbias


# The forward ops also return the LayerNorm statistics (B, S) fp32 of their LayerNorm input, which the backward
# reads instead of recomputing them (as flash-attention's LayerNorm does): one reduction per backward row instead
# of three. The public functions drop them.
# Packed (varlen) calls pass the layout as tensors, cu_seqlens (n + 1,) and seg_text_lens (n,) int32 (the kernels
# read them on the device), and max_len (the launch grid); text_len and offset are then 0.


def _host_segments(cu_seqlens, seg_text_lens):
    """The layout of a packed op call, rebuilt on the host for the pure-torch path (None: a dense call). The grid
    (1, 1, vision tokens) stands in for the real one: per-token ops read only the text and vision counts."""
    if cu_seqlens is None:
        return None
    offsets, text_lens = cu_seqlens.tolist(), seg_text_lens.tolist()
    grids = [(1, 1, hi - lo - L) for lo, hi, L in zip(offsets[:-1], offsets[1:], text_lens)]
    return Segments(text_lens, grids, device=cu_seqlens.device)


@torch.library.custom_op("cogvideox::expert_adaln", mutates_args=())
def _expert_adaln_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, text_len: int,
                     weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, offset: int = 0,
                     cu_seqlens: torch.Tensor | None = None, seg_text_lens: torch.Tensor | None = None,
                     max_len: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> out, mean, rstd."""
    if use_triton(x) and x.numel() > 0:
        return expert_adaln_fwd(x, None, None, shift, scale, text_len, weight, bias, eps, offset, cu_seqlens,
                                seg_text_lens, max_len)[1:]
    seg = _host_segments(cu_seqlens, seg_text_lens)
    return (expert_adaln_ref(x, shift, scale, text_len, weight, bias, eps, offset, seg), *_row_stats(x, eps))


@torch.library.custom_op("cogvideox::expert_adaln_residual", mutates_args=())
def _expert_adaln_residual_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                              scale: torch.Tensor, text_len: int, weight: torch.Tensor | None,
                              bias: torch.Tensor | None, eps: float, offset: int = 0,
                              cu_seqlens: torch.Tensor | None = None, seg_text_lens: torch.Tensor | None = None,
                              max_len: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> x_new, out, mean, rstd (the statistics of x_new)."""
    if use_triton(x) and x.numel() > 0:
        return expert_adaln_fwd(x, y, gate, shift, scale, text_len, weight, bias, eps, offset, cu_seqlens,
                                seg_text_lens, max_len)
    seg = _host_segments(cu_seqlens, seg_text_lens)
    x_new, out = expert_adaln_residual_ref(x, y, gate, shift, scale, text_len, weight, bias, eps, offset, seg)
    return (x_new, out, *_row_stats(x_new, eps))


_EMPTY_GRAD_SHAPE = (0,)  # custom ops cannot return None: absent gradients travel as empty tensors
_SEVEN_GRADS = tuple[(torch.Tensor,) * 7]  # dx, dy, dgate, dshift, dscale, dweight, dbias


@torch.library.custom_op("cogvideox::expert_adaln_bwd", mutates_args=())
def _expert_adaln_bwd_op(dout: torch.Tensor, dx_new: torch.Tensor | None, x: torch.Tensor, mean: torch.Tensor,
                         rstd: torch.Tensor, y: torch.Tensor | None, gate: torch.Tensor | None, scale: torch.Tensor,
                         text_len: int, weight: torch.Tensor | None, bias: torch.Tensor | None, offset: int = 0,
                         cu_seqlens: torch.Tensor | None = None, seg_text_lens: torch.Tensor | None = None,
                         max_len: int = 0) -> _SEVEN_GRADS:
    """-> dx, dy, dgate, dshift, dscale, dweight, dbias; x is the LayerNorm input (x_new for the residual op),
    mean / rstd what its forward returned."""
    args = (dout, dx_new, x, mean, rstd, y, gate, scale, text_len, weight, bias, offset)
    if use_triton(x) and x.numel() > 0:
        grads = expert_adaln_bwd(*args, cu_seqlens, seg_text_lens, max_len)
    else:
        grads = _expert_adaln_bwd_torch(*args, _host_segments(cu_seqlens, seg_text_lens))
    return tuple(g if g is not None else x.new_empty(_EMPTY_GRAD_SHAPE) for g in grads)


def _stats_like(x):
    return x.new_empty(x.shape[:2], dtype=torch.float32), x.new_empty(x.shape[:2], dtype=torch.float32)


@_expert_adaln_op.register_fake
def _(x, shift, scale, text_len, weight, bias, eps, offset=0, cu_seqlens=None, seg_text_lens=None, max_len=0):
    return (x.new_empty(x.shape), *_stats_like(x))


@_expert_adaln_residual_op.register_fake
def _(x, y, gate, shift, scale, text_len, weight, bias, eps, offset=0, cu_seqlens=None, seg_text_lens=None,
      max_len=0):
    return (x.new_empty(x.shape), x.new_empty(x.shape), *_stats_like(x))


@_expert_adaln_bwd_op.register_fake
def _(dout, dx_new, x, mean, rstd, y, gate, scale, text_len, weight, bias, offset=0, cu_seqlens=None,
      seg_text_lens=None, max_len=0):
    def like(t):
        return t.new_empty(t.shape) if t is not None else x.new_empty(_EMPTY_GRAD_SHAPE)
    return like(x), like(y), like(gate), like(scale), like(scale), like(weight), like(bias)


def _grads_out(t, g):
    return g if t is not None else None


_NO_LAYOUT_GRADS = (None,) * 5   # eps, offset, cu_seqlens, seg_text_lens, max_len


def _setup_plain(ctx, inputs, output):
    x, shift, scale, text_len, weight, bias, eps, offset, cu_seqlens, seg_text_lens, max_len = inputs
    out, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, mean, rstd, scale, weight, bias, cu_seqlens, seg_text_lens)
    ctx.text_len, ctx.offset, ctx.max_len = text_len, offset, max_len


def _backward_plain(ctx, dout, _dmean, _drstd):
    x, mean, rstd, scale, weight, bias, cu_seqlens, seg_text_lens = ctx.saved_tensors
    dx, _, _, dshift, dscale, dw, db = torch.ops.cogvideox.expert_adaln_bwd(
        dout, None, x, mean, rstd, None, None, scale, ctx.text_len, weight, bias, ctx.offset, cu_seqlens,
        seg_text_lens, ctx.max_len)
    return dx, dshift, dscale, None, _grads_out(weight, dw), _grads_out(bias, db), *_NO_LAYOUT_GRADS


def _setup_residual(ctx, inputs, output):
    x, y, gate, shift, scale, text_len, weight, bias, eps, offset, cu_seqlens, seg_text_lens, max_len = inputs
    x_new, out, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x_new, mean, rstd, y, gate, scale, weight, bias,  # x_new: the residual stream lives on
                          cu_seqlens, seg_text_lens)
    ctx.text_len, ctx.offset, ctx.max_len = text_len, offset, max_len


def _backward_residual(ctx, dx_new, dout, _dmean, _drstd):
    # autograd hands zeros for an unused output
    x_new, mean, rstd, y, gate, scale, weight, bias, cu_seqlens, seg_text_lens = ctx.saved_tensors
    dx, dy, dgate, dshift, dscale, dw, db = torch.ops.cogvideox.expert_adaln_bwd(
        dout, dx_new, x_new, mean, rstd, y, gate, scale, ctx.text_len, weight, bias, ctx.offset, cu_seqlens,
        seg_text_lens, ctx.max_len)
    return dx, dy, dgate, dshift, dscale, None, _grads_out(weight, dw), _grads_out(bias, db), *_NO_LAYOUT_GRADS


_expert_adaln_op.register_autograd(_backward_plain, setup_context=_setup_plain)
_expert_adaln_residual_op.register_autograd(_backward_residual, setup_context=_setup_residual)


# A row is one BLOCK_D = next_power_of_2(D) vector in registers (no loop over D): 65536 channels are 128 fp32 per
# thread per vector at the 16-warp cap, far past what fits without spills (CogVideoX: D <= 3072), and Triton
# refuses blocks over 2^20 elements with a raw compile error. Larger rows are refused up front, on every path.
MAX_D = 65536


def _check(x, mods, text_len, weight, bias, offset, segments):
    """Validate the public arguments; -> the op's (text_len, cu_seqlens, seg_text_lens, max_len)."""
    check_tensor("x", x, ndim=3)
    B, S, D = x.shape
    if D > MAX_D:
        raise ValueError(f"x has D = {D} channels, more than the kernels' limit of {MAX_D} (a row is held in "
                         f"registers as one block); use expert_adaln_ref for such rows")
    check_offset(offset)
    if segments is None:
        check_text_len(text_len, None)   # the global text length: a shard may lie wholly inside the text
        layout = (text_len, None, None, 0)
    else:
        check_segments(segments).check("x", x)
        if text_len is not None:
            raise ValueError(f"text_len must be None when segments are given (each segment's text length comes "
                             f"from segments), got {text_len!r}")
        if offset != 0:
            raise ValueError(f"offset must be 0 when segments are given (packing and context parallelism do not "
                             f"combine), got {offset}")
        B = segments.n   # one modulation row per segment
        layout = (0, segments.cu_seqlens, segments.text_lens_t, segments.max_len)
    E = None
    for name, p in mods.items():
        check_tensor(name, p, ndim=3)
        check_like(name, p, "x", x)
        if E is None:
            E = p.shape[1]
            if E not in (1, 2):
                raise ValueError(f"{name} must have shape (B, E, D) with E in (1, 2), got {tuple(p.shape)}")
        check_shape(name, p, (B, E, D))
    check_params(x, D, weight=weight, bias=bias)
    return layout


def expert_adaln(x, shift, scale, text_len, weight=None, bias=None, eps=1e-5, offset=0, segments=None):
    """x: (B, S, D); shift, scale: (B, E, D), E in (1, 2); weight, bias: (D,) or None -> out (B, S, D).

    offset: the global index of x's first token when x is a context-parallel shard of the joint sequence;
    text_len is the global text length (it may exceed offset + S: then every row of the shard is text).
    segments: a kernels.Segments; x is then the packed (1, N, D) sequence, shift / scale (n, E, D) (one row per
    segment), text_len None and offset 0. The result equals each segment run alone as a B = 1 call.
    """
    layout = _check(x, {"shift": shift, "scale": scale}, text_len, weight, bias, offset, segments)
    return torch.ops.cogvideox.expert_adaln(x, shift, scale, layout[0], weight, bias, check_eps(eps), offset,
                                            *layout[1:])[0]


def expert_adaln_residual(x, y, gate, shift, scale, text_len, weight=None, bias=None, eps=1e-5, offset=0,
                          segments=None):
    """x, y: (B, S, D); gate, shift, scale: (B, E, D) -> (x_new, out), both (B, S, D). offset, segments: as
    expert_adaln (packed: x, y (1, N, D), gate / shift / scale (n, E, D))."""
    check_tensor("x", x, ndim=3)  # before y's checks, which compare against x
    check_tensor("y", y, ndim=3)
    check_like("y", y, "x", x)
    if y.shape != x.shape:
        raise ValueError(f"y must have the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
    layout = _check(x, {"gate": gate, "shift": shift, "scale": scale}, text_len, weight, bias, offset, segments)
    x_new, out, _, _ = torch.ops.cogvideox.expert_adaln_residual(x, y, gate, shift, scale, layout[0], weight, bias,
                                                                 check_eps(eps), offset, *layout[1:])
    return x_new, out


# kernels/__init__ binds `kernels.expert_adaln` to the function above, hiding this module from attribute access:
# the host helpers the README documents as kernels.expert_adaln.<name> are reachable from the function too.
expert_adaln.launch_config = launch_config
expert_adaln.expert_rows = expert_rows
expert_adaln.expert_sum = expert_sum
