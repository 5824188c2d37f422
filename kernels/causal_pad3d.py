"""Causal 3D-conv padding: the frames in front of a temporally causal conv, plus zero spatial padding.

x: (B, C, T, H, W) -> out (B, C, T + kernel_t - 1, H + 2 pad_h, W + 2 pad_w), new_cache (B, C, kernel_t - 1, H, W).
The kernel_t - 1 frames in front are `cache` when given (a later chunk of a chunked causal conv), else copies of
frame 0 (mode "first", CogVideoX's CausalConv3d) or zeros (mode "zeros"). Mode "replicate" replicates edges in
all three dimensions (F.pad replicate) and takes no cache. new_cache is the last kernel_t - 1 frames of the
temporally padded input, without spatial padding: what the next chunk needs.

Fused: the torch.cat of front frames (and F.pad, when asked to pad) and the .clone() of the cache become one pass
that reads every input element once and writes out and new_cache once (diffusers does cat + clone: two copies).

Kernel layout. What the sm_90 builds compile to at the VAE's launch arguments is in kernels._static
(`python -m bench kernels --static`; tests/test_inspect.py keeps it).
- Flat kernels, no spatial pad (how cogvideox.vae calls it: the conv pads H and W itself, as diffusers' does) and
  contiguous (H, W) frames: a frame is a flat run of H*W elements, so one program copies BLOCK = 2048 elements
  (8 warps, one 16-byte bf16 vector a thread) of one output frame; grid = B*C*T_out*cdiv(H*W, 2048) (237,952
  for the VAE's (1, 128, 9, 480, 720) chunk). Frame sizes and strides arrive divided by VEC (the widest vector,
  at most 16 bytes, that all of them are multiples of) and are multiplied back by the constexpr: triton's launcher
  marks only multiples of 16, and H*W = 5400 at 60 x 90 is a multiple of 8, not 16. Every load and store is then
  a 128-bit LDG / STG (24-30 registers, 8 programs an SM). Backward: the same tiling over the input frames.
- 2-D kernels, a spatial pad: one program per output tile of BLOCK_H x BLOCK_W = 8 x 256 elements of one
  (b, c, t_out) frame. Grid axis 0 = B*C*T_out*cdiv(H_out, BLOCK_H) (limit 2^31 - 1), axis 1 =
  cdiv(W_out, BLOCK_W), so nothing comes near CUDA's 65535 limit on grid y/z. The source frame (x, cache or
  zeros) is uniform per program, so choosing it is a scalar decision and the tile is a masked copy. The w - pad
  shift and the padded row pitch (722 at 720) leave these accesses 2-byte scalars: the reason the VAE does not
  pad here.
- Frames that belong to new_cache are stored a second time from the same registers.
- Backward: a gather, hence deterministic. One program per tile of an *input* frame q: q < T is frame q of x,
  q >= T is frame q - T of cache. Each element sums the output-grad elements that were copied from it: its own
  padded position, the front frames when it is x's frame 0 in mode "first"/"replicate", the replicated border rows
  and columns in mode "replicate", and new_cache's grad when its padded frame is among the last kernel_t - 1.
  Sums are in fp32, rounded once at the store.
- Offsets: program ids are cast to int64 and every frame's base offset is int64: the VAE's full-resolution
  activation (1 x 128 x 49 x 480 x 720) has 2.17e9 elements. Offsets inside one frame stay int32 (the launcher
  checks that a frame spans < 2^31 elements), which halves the per-element index registers.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._dispatch import check_grid, check_like, check_shape, check_tensor, last_dim_contiguous, use_triton
from ._triton_common import cast_rtne

MODES = ("first", "zeros", "replicate")
_MODE_ID = {m: i for i, m in enumerate(MODES)}


def causal_pad3d_ref(x, kernel_t, cache=None, pad_hw=(0, 0), mode="first"):
    B, C, T, H, W = x.shape
    kt = kernel_t - 1
    ph, pw = pad_hw
    if mode == "replicate" and x.numel() == 0:    # F.pad(replicate) rejects empty dims; the result is empty too
        return x.new_empty(B, C, T + kt, H + 2 * ph, W + 2 * pw), x.new_empty(B, C, kt, H, W)
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


def causal_pad3d_bwd_ref(dout, dnc, T, kernel_t, pad_h, pad_w, mode, has_cache):
    """The gradient of causal_pad3d_ref in plain torch (fp32 sums, one rounding): (dx, dcache or an empty tensor).
    Written out rather than taken from autograd: inside a custom op's impl autograd is switched off."""
    kt = kernel_t - 1
    B, C, Tp, Ho, Wo = dout.shape
    H, W = Ho - 2 * pad_h, Wo - 2 * pad_w
    g = dout.float()
    if mode == "replicate" and H * W == 0:         # nothing was copied: the gradients are empty
        return dout.new_empty(B, C, T, H, W), dout.new_empty(B, C, kt, H, W) if has_cache else dout.new_empty(0)
    if mode == "replicate":   # fold the replicated border rows / columns onto the edge they copy
        rows = g[:, :, :, pad_h:pad_h + H].clone()
        rows[:, :, :, 0] += g[:, :, :, :pad_h].sum(3)
        rows[:, :, :, H - 1] += g[:, :, :, pad_h + H:].sum(3)
        g = rows[..., pad_w:pad_w + W].clone()
        g[..., 0] += rows[..., :pad_w].sum(4)
        g[..., W - 1] += rows[..., pad_w + W:].sum(4)
    else:
        g = g[:, :, :, pad_h:pad_h + H, pad_w:pad_w + W].clone()
    if dnc is not None and kt:
        g[:, :, Tp - kt:] += dnc.float()                          # (B, C, Tp, H, W): grad of padded_t
    dx = g[:, :, kt:].clone()
    if not has_cache and mode != "zeros" and kt:
        dx[:, :, 0] += g[:, :, :kt].sum(2)
    dcache = g[:, :, :kt].to(dout.dtype).contiguous() if has_cache else dout.new_empty(0)
    return dx.to(dout.dtype), dcache


@triton.jit
def _pad_tile(n_hb, Tp, Ho, Wo, PH, PW, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """The tile of the padded output this program writes (grid: _grid) -> its frame plane = bc * Tp + tp with
    bc = b * C + c (int64 scalars), output rows (BLOCK_H, 1) and columns (1, BLOCK_W), their in-bounds mask, and
    the input rows / columns they sit on before clamping (int32: offsets inside one frame)."""
    pid = tl.program_id(0).to(tl.int64)
    plane = pid // n_hb
    h_out = ((pid % n_hb) * BLOCK_H).to(tl.int32) + tl.arange(0, BLOCK_H)[:, None]
    w_out = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    in_out = (h_out < Ho) & (w_out < Wo)
    return plane, plane % Tp, plane // Tp, h_out, w_out, in_out, h_out - PH, w_out - PW


@triton.jit
def _store_padded(out_ptr, nc_ptr, val, plane, tp, bc, h_out, w_out, in_out, h_in, w_in, interior,
                  H, W, KT, Tp, Ho, Wo):
    """Store a tile of out; frames among the last KT of the temporally padded input go to new_cache as well."""
    tl.store(out_ptr + plane * Ho * Wo + h_out * Wo + w_out, val, mask=in_out)
    nc_frame = tp - (Tp - KT)
    tl.store(nc_ptr + (bc * KT + nc_frame) * H * W + h_in * W + w_in, val,
             mask=tl.where(nc_frame >= 0, interior, False))


@triton.jit
def _causal_pad3d_fwd_kernel(x_ptr, cache_ptr, out_ptr, nc_ptr,
                             C, T, H, W, KT, PH, PW, Tp, Ho, Wo, n_hb,
                             sxb, sxc, sxt, sxh, scb, scc, sct, sch,
                             MODE: tl.constexpr, HAS_CACHE: tl.constexpr,
                             BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    # frame offsets (scalars) are int64; offsets inside one frame fit int32 (the launcher checks), which keeps the
    # per-element index math narrow
    plane, tp, bc, h_out, w_out, in_out, h_in, w_in = _pad_tile(n_hb, Tp, Ho, Wo, PH, PW, BLOCK_H, BLOCK_W)
    b = bc // C
    c = bc % C
    interior = in_out & (h_in >= 0) & (h_in < H) & (w_in >= 0) & (w_in < W)
    if MODE == 2:   # replicate: every output element reads the clamped input position
        h_src = tl.minimum(tl.maximum(h_in, 0), H - 1)
        w_src = tl.minimum(tl.maximum(w_in, 0), W - 1)
        valid = in_out
    else:
        h_src = h_in
        w_src = w_in
        valid = interior
    # scalar conditions enter masks through tl.where: the interpreter mistypes `block & scalar_bool` as an int mask
    front = tp < KT
    if HAS_CACHE:
        from_x = tp >= KT
        c_frame = cache_ptr + b * scb + c * scc + tl.minimum(tp, KT - 1) * sct
        c_val = tl.load(c_frame + h_src * sch + w_src, mask=tl.where(front, valid, False), other=0.0)
    elif MODE == 1:   # zeros in front
        from_x = tp >= KT
    else:             # first / replicate: front frames are copies of frame 0
        from_x = tp >= 0
    x_frame = x_ptr + b * sxb + c * sxc + tl.maximum(tp - KT, 0) * sxt
    val = tl.load(x_frame + h_src * sxh + w_src, mask=tl.where(from_x, valid, False), other=0.0)
    if HAS_CACHE:
        val = tl.where(front, c_val, val)
    # a copy: values are moved in their own dtype, no arithmetic, so bf16 needs no fp32 detour
    _store_padded(out_ptr, nc_ptr, val, plane, tp, bc, h_out, w_out, in_out, h_in, w_in, interior, H, W, KT, Tp,
                  Ho, Wo)


@triton.jit
def _causal_pad3d_bwd_kernel(dout_ptr, dnc_ptr, dx_ptr, dc_ptr,
                             C, T, H, W, KT, PH, PW, Tp, Ho, Wo, n_hb, Q0, NQ, NH, NW,
                             MODE: tl.constexpr, HAS_CACHE: tl.constexpr, HAS_DNC: tl.constexpr,
                             BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    hb = pid % n_hb
    rest = pid // n_hb
    q = Q0 + rest % NQ                                    # q < T: x frame q; q >= T: cache frame q - T
    bc = rest // NQ
    h = (hb * BLOCK_H).to(tl.int32) + tl.arange(0, BLOCK_H)[:, None]
    w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    mask = (h < H) & (w < W)
    is_x = q < T
    p_main = tl.where(is_x, q + KT, q - T)                # the frame's own index in the temporally padded input
    n_front = 0
    if not HAS_CACHE and MODE != 1:                       # x's frame 0 also fed the KT front frames
        n_front = tl.where(q == 0, KT, 0)
    acc = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
    for n in range(0, 1 + n_front):
        p = tl.where(n == 0, p_main, n - 1)
        dout_plane = dout_ptr + (bc * Tp + p) * Ho * Wo
        # NH = NW = 1 unless replicate: then row i in 1..PH is padded row i-1 (from h == 0) and row i > PH is
        # padded row H+PH+(i-PH-1) (from h == H-1); columns likewise.
        for i in range(0, NH):
            r = tl.where(i == 0, h + PH, tl.where(i <= PH, i - 1, H + i - 1))
            r_ok = tl.where(i == 0, mask, tl.where(i <= PH, mask & (h == 0), mask & (h == H - 1)))
            for j in range(0, NW):
                s = tl.where(j == 0, w + PW, tl.where(j <= PW, j - 1, W + j - 1))
                s_ok = tl.where(j == 0, r_ok, tl.where(j <= PW, r_ok & (w == 0), r_ok & (w == W - 1)))
                g = tl.load(dout_plane + r * Wo + s, mask=s_ok, other=0.0)
                acc += g.to(tl.float32)
        if HAS_DNC:
            nc_frame = p - T
            g = tl.load(dnc_ptr + (bc * KT + nc_frame) * H * W + h * W + w, mask=tl.where(nc_frame >= 0, mask, False),
                        other=0.0)
            acc += g.to(tl.float32)
    x_frame = tl.minimum(q, T - 1)
    tl.store(dx_ptr + (bc * T + x_frame) * H * W + h * W + w, cast_rtne(acc, dx_ptr.dtype.element_ty),
             mask=tl.where(is_x, mask, False))
    if HAS_CACHE:
        c_frame = tl.maximum(q - T, 0)
        tl.store(dc_ptr + (bc * KT + c_frame) * H * W + h * W + w, cast_rtne(acc, dc_ptr.dtype.element_ty),
                 mask=tl.where(is_x, False, mask))


@triton.jit
def _flat_chunk(n_chunks, HWV, VEC: tl.constexpr, BLOCK: tl.constexpr):
    """The flat kernels' program -> (its frame index, BLOCK offsets inside the frame, their mask, HW). Frame sizes
    and strides arrive divided by VEC and are multiplied back by the constexpr VEC, so the compiler knows they are
    multiples of VEC (triton's launcher only marks multiples of 16): every access can be one VEC-wide vector."""
    pid = tl.program_id(0).to(tl.int64)
    HW = HWV * VEC
    idx = ((pid % n_chunks) * BLOCK).to(tl.int32) + tl.arange(0, BLOCK)
    return pid // n_chunks, idx, idx < HW, HW


@triton.jit
def _causal_pad3d_flat_fwd_kernel(x_ptr, cache_ptr, out_ptr, nc_ptr, C, KT, Tp, n_chunks, HWV,
                                  sxb, sxc, sxt, scb, scc, sct,
                                  MODE: tl.constexpr, HAS_CACHE: tl.constexpr, VEC: tl.constexpr,
                                  BLOCK: tl.constexpr):
    plane, idx, mask, HW = _flat_chunk(n_chunks, HWV, VEC, BLOCK)   # plane = bc * Tp + tp
    tp = plane % Tp
    bc = plane // Tp
    b = bc // C
    c = bc % C
    front = tp < KT
    if HAS_CACHE:
        from_x = tp >= KT
        c_frame = cache_ptr + (b * scb + c * scc + tl.minimum(tp, KT - 1) * sct) * VEC
        c_val = tl.load(c_frame + idx, mask=tl.where(front, mask, False), other=0.0)
    elif MODE == 1:   # zeros in front
        from_x = tp >= KT
    else:             # first / replicate (no spatial pad: the same): front frames are copies of frame 0
        from_x = tp >= 0
    x_frame = x_ptr + (b * sxb + c * sxc + tl.maximum(tp - KT, 0) * sxt) * VEC
    val = tl.load(x_frame + idx, mask=tl.where(from_x, mask, False), other=0.0)
    if HAS_CACHE:
        val = tl.where(front, c_val, val)
    tl.store(out_ptr + plane * HW + idx, val, mask=mask)
    nc_frame = tp - (Tp - KT)
    tl.store(nc_ptr + (bc * KT + nc_frame) * HW + idx, val, mask=tl.where(nc_frame >= 0, mask, False))


@triton.jit
def _causal_pad3d_flat_bwd_kernel(dout_ptr, dnc_ptr, dx_ptr, dc_ptr, T, KT, Tp, n_chunks, HWV, Q0, NQ,
                                  MODE: tl.constexpr, HAS_CACHE: tl.constexpr, HAS_DNC: tl.constexpr,
                                  VEC: tl.constexpr, BLOCK: tl.constexpr):
    rest, idx, mask, HW = _flat_chunk(n_chunks, HWV, VEC, BLOCK)
    q = Q0 + rest % NQ                                    # q < T: x frame q; q >= T: cache frame q - T
    bc = rest // NQ
    is_x = q < T
    p_main = tl.where(is_x, q + KT, q - T)                # the frame's own index in the temporally padded input
    n_front = 0
    if not HAS_CACHE and MODE != 1:                       # x's frame 0 also fed the KT front frames
        n_front = tl.where(q == 0, KT, 0)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for n in range(0, 1 + n_front):
        p = tl.where(n == 0, p_main, n - 1)
        acc += tl.load(dout_ptr + (bc * Tp + p) * HW + idx, mask=mask, other=0.0).to(tl.float32)
        if HAS_DNC:
            nc_frame = p - T                              # padded frame p is new_cache frame p - (Tp - KT)
            acc += tl.load(dnc_ptr + (bc * KT + nc_frame) * HW + idx, mask=tl.where(nc_frame >= 0, mask, False),
                           other=0.0).to(tl.float32)
    x_frame = tl.minimum(q, T - 1)
    tl.store(dx_ptr + (bc * T + x_frame) * HW + idx, cast_rtne(acc, dx_ptr.dtype.element_ty),
             mask=tl.where(is_x, mask, False))
    if HAS_CACHE:
        c_frame = tl.maximum(q - T, 0)
        tl.store(dc_ptr + (bc * KT + c_frame) * HW + idx, cast_rtne(acc, dc_ptr.dtype.element_ty),
                 mask=tl.where(is_x, False, mask))


def _tile(rows: int, cols: int):
    """(BLOCK_H, BLOCK_W, num_warps) for a frame of rows x cols: 2048-element tiles, up to 256 wide along W, 8 warps
    (8 elements = one 16-byte bf16 vector per thread; 26-80 registers on sm_90 for the forward, so 8 blocks of
    256 threads fit an SM and keep ~32 KB of loads in flight; larger tiles cost registers, not bandwidth)."""
    block_w = min(256, triton.next_power_of_2(max(cols, 1)))
    block_h = min(triton.next_power_of_2(max(rows, 1)), max(1, 2048 // block_w))
    return block_h, block_w, 8


FLAT_BLOCK = 2048   # elements per program of the flat kernels: 8 warps x 32 lanes x one 16-byte bf16 vector


def flat_frames(*tensors) -> bool:
    """True when every given 5-D tensor's (H, W) frames are contiguous: the flat kernels then apply."""
    return all(t is None or t.shape[3] <= 1 or t.stride(3) == t.shape[4] for t in tensors)


def vec_width(item: int, *ints) -> int:
    """The widest vector (elements, at most 16 bytes) that every int (strides, frame sizes) is a multiple of."""
    v = max(1, 16 // item)
    while v > 1 and any(n % v for n in ints):
        v //= 2
    return v


def flat_launch(n_frames: int, hw: int):
    """(BLOCK, num_warps, n_chunks, grid) of the flat kernels: one program per BLOCK elements of one frame."""
    block = min(FLAT_BLOCK, triton.next_power_of_2(max(hw, 1)))
    n_chunks = triton.cdiv(hw, block)
    return block, 8 if block >= FLAT_BLOCK else 4, n_chunks, check_grid((n_frames * n_chunks,))


def _check_frame_span(name: str, t: torch.Tensor):
    """Offsets inside one (H, W) frame are int32 in the kernels."""
    if t.dim() == 5 and t.shape[3] * t.shape[4] and (t.shape[3] - 1) * t.stride(3) + t.shape[4] >= 2**31:
        raise ValueError(f"{name}: one frame spans >= 2^31 elements (shape {tuple(t.shape)}, strides {t.stride()})")


def _frames(**tensors):
    """5-D inputs as the kernels take them: a unit last stride (copied only where missing), frames that fit int32
    offsets. None (an absent input) passes through."""
    out = [last_dim_contiguous(t) for t in tensors.values()]
    for name, t in zip(tensors, out):
        if t is not None:
            _check_frame_span(name, t)
    return out


def _grid(n_planes: int, rows: int, cols: int, block_h: int, block_w: int):
    """One program per BLOCK_H x BLOCK_W tile: axis 0 walks (plane, row block), axis 1 the column blocks."""
    n_hb = triton.cdiv(rows, block_h)
    return n_hb, check_grid((n_planes * n_hb, triton.cdiv(cols, block_w)))


def causal_pad3d_fwd(x, kernel_t, cache, pad_h, pad_w, mode):
    x, cache = _frames(x=x, cache=cache)
    B, C, T, H, W = x.shape
    kt = kernel_t - 1
    Tp, Ho, Wo = T + kt, H + 2 * pad_h, W + 2 * pad_w
    out = x.new_empty(B, C, Tp, Ho, Wo)
    new_cache = x.new_empty(B, C, kt, H, W)
    if out.numel() == 0:
        return out, new_cache
    has_cache = cache is not None
    c = cache if has_cache else x
    _check_frame_span("out", out)
    if pad_h == pad_w == 0 and flat_frames(x, c):
        # no spatial padding (the conv pads H and W itself, as diffusers' does): frames are copied flat
        vec = vec_width(x.element_size(), H * W, *x.stride()[:3], *c.stride()[:3])
        block, warps, n_chunks, grid = flat_launch(B * C * Tp, H * W)
        _causal_pad3d_flat_fwd_kernel[grid](
            x, c, out, new_cache, C, kt, Tp, n_chunks, H * W // vec,
            *(s // vec for s in x.stride()[:3]), *(s // vec for s in c.stride()[:3]),
            MODE=_MODE_ID[mode], HAS_CACHE=int(has_cache), VEC=vec, BLOCK=block, num_warps=warps)
        return out, new_cache
    block_h, block_w, warps = _tile(Ho, Wo)
    n_hb, grid = _grid(B * C * Tp, Ho, Wo, block_h, block_w)
    _causal_pad3d_fwd_kernel[grid](
        x, c, out, new_cache, C, T, H, W, kt, pad_h, pad_w, Tp, Ho, Wo, n_hb,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3), c.stride(0), c.stride(1), c.stride(2), c.stride(3),
        MODE=_MODE_ID[mode], HAS_CACHE=int(has_cache), BLOCK_H=block_h, BLOCK_W=block_w, num_warps=warps)
    return out, new_cache


def causal_pad3d_bwd(dout, dnc, T, kernel_t, pad_h, pad_w, mode, has_cache, need_dx=True):
    """dout (B, C, Tp, Ho, Wo), dnc (B, C, kt, H, W) or None -> dx (B, C, T, H, W), dcache (B, C, kt, H, W) or
    an empty tensor without a cache. need_dx=False computes dcache only (group_norm_silu_pad fuses its own dx)."""
    dout = dout.contiguous()
    dnc = None if dnc is None else dnc.contiguous()
    B, C, Tp, Ho, Wo = dout.shape
    kt = kernel_t - 1
    H, W = Ho - 2 * pad_h, Wo - 2 * pad_w
    dx = dout.new_empty(B, C, T, H, W) if need_dx else dout.new_empty(0)
    dcache = dout.new_empty(B, C, kt, H, W) if has_cache else dout.new_empty(0)
    q0 = 0 if need_dx else T
    nq = (T if need_dx else 0) + (kt if has_cache else 0)
    if B * C * nq * H * W == 0:
        return dx, dcache
    _check_frame_span("grad", dout)
    if pad_h == pad_w == 0:                              # dout, dnc contiguous: flat frames
        vec = vec_width(dout.element_size(), H * W)
        block, warps, n_chunks, grid = flat_launch(B * C * nq, H * W)
        _causal_pad3d_flat_bwd_kernel[grid](
            dout, dout if dnc is None else dnc, dx if need_dx else dout, dcache if has_cache else dout,
            T, kt, Tp, n_chunks, H * W // vec, q0, nq,
            MODE=_MODE_ID[mode], HAS_CACHE=int(has_cache), HAS_DNC=int(dnc is not None), VEC=vec, BLOCK=block,
            num_warps=warps)
        return dx, dcache
    replicate = mode == "replicate"
    block_h, block_w, warps = _tile(H, W)
    n_hb, grid = _grid(B * C * nq, H, W, block_h, block_w)
    _causal_pad3d_bwd_kernel[grid](
        dout, dout if dnc is None else dnc, dx if need_dx else dout, dcache if has_cache else dout,
        C, T, H, W, kt, pad_h, pad_w, Tp, Ho, Wo, n_hb, q0, nq,
        1 + 2 * pad_h if replicate else 1, 1 + 2 * pad_w if replicate else 1,
        MODE=_MODE_ID[mode], HAS_CACHE=int(has_cache), HAS_DNC=int(dnc is not None),
        BLOCK_H=block_h, BLOCK_W=block_w, num_warps=warps)
    return dx, dcache


@torch.library.custom_op("cogvideox::causal_pad3d", mutates_args=())
def _causal_pad3d_op(x: torch.Tensor, kernel_t: int, cache: Optional[torch.Tensor], pad_h: int, pad_w: int,
                     mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x):
        return causal_pad3d_fwd(x, kernel_t, cache, pad_h, pad_w, mode)
    return causal_pad3d_ref(x, kernel_t, cache, (pad_h, pad_w), mode)


@_causal_pad3d_op.register_fake
def _(x, kernel_t, cache, pad_h, pad_w, mode):
    B, C, T, H, W = x.shape
    kt = kernel_t - 1
    return x.new_empty(B, C, T + kt, H + 2 * pad_h, W + 2 * pad_w), x.new_empty(B, C, kt, H, W)


@torch.library.custom_op("cogvideox::causal_pad3d_bwd", mutates_args=())
def _causal_pad3d_bwd_op(dout: torch.Tensor, dnc: Optional[torch.Tensor], T: int, kernel_t: int, pad_h: int,
                         pad_w: int, mode: str, has_cache: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(dout):
        return causal_pad3d_bwd(dout, dnc, T, kernel_t, pad_h, pad_w, mode, has_cache)
    return causal_pad3d_bwd_ref(dout, dnc, T, kernel_t, pad_h, pad_w, mode, has_cache)


@_causal_pad3d_bwd_op.register_fake
def _(dout, dnc, T, kernel_t, pad_h, pad_w, mode, has_cache):
    B, C, Tp, Ho, Wo = dout.shape
    H, W, kt = Ho - 2 * pad_h, Wo - 2 * pad_w, kernel_t - 1
    return dout.new_empty(B, C, T, H, W), dout.new_empty(B, C, kt, H, W) if has_cache else dout.new_empty(0)


def _setup_context(ctx, inputs, output):
    x, kernel_t, cache, pad_h, pad_w, mode = inputs
    ctx.args = (x.shape[2], kernel_t, pad_h, pad_w, mode, cache is not None)


def _backward(ctx, dout, dnc):
    T, kernel_t, pad_h, pad_w, mode, has_cache = ctx.args
    dx, dcache = _causal_pad3d_bwd_op(dout.contiguous(), None if dnc is None else dnc.contiguous(),
                                      T, kernel_t, pad_h, pad_w, mode, has_cache)
    return dx, None, dcache if has_cache else None, None, None, None


_causal_pad3d_op.register_autograd(_backward, setup_context=_setup_context)


def _check(x, kernel_t, cache, pad_hw, mode):
    check_tensor("x", x, ndim=5)
    if x.shape[2] < 1:
        raise ValueError(f"x must have at least one frame, got shape {tuple(x.shape)}")
    if isinstance(kernel_t, bool) or not isinstance(kernel_t, int) or kernel_t < 1:
        raise ValueError(f"kernel_t must be an int >= 1, got {kernel_t!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(pad_hw, (tuple, list)) or len(pad_hw) != 2 or \
            any((not isinstance(p, int)) or isinstance(p, bool) or p < 0 for p in pad_hw):
        raise ValueError(f"pad_hw must be two non-negative ints, got {pad_hw!r}")
    if mode == "replicate" and any(p > 0 and n < 1 for p, n in zip(pad_hw, x.shape[3:])):
        raise ValueError(f"mode='replicate' cannot pad an empty dimension, x has shape {tuple(x.shape)}")
    if cache is not None:
        if mode == "replicate":
            raise ValueError("mode='replicate' takes no cache")
        check_tensor("cache", cache, ndim=5)
        check_like("cache", cache, "x", x)
        B, C, T, H, W = x.shape
        check_shape("cache", cache, (B, C, kernel_t - 1, H, W))


def causal_pad3d(x, kernel_t, cache=None, pad_hw=(0, 0), mode="first"):
    """x: (B, C, T, H, W) -> (out (B, C, T+kernel_t-1, H+2ph, W+2pw), new_cache (B, C, kernel_t-1, H, W))."""
    _check(x, kernel_t, cache, pad_hw, mode)
    pad_h, pad_w = pad_hw
    return _causal_pad3d_op(x, kernel_t, cache, pad_h, pad_w, mode)
