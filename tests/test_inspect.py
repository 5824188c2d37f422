"""Compiled-code properties of the kernels at CogVideoX's real launch arguments (kernels._static: sm_90 builds
specialized as triton's launcher specializes them, SASS from the cuobjdump in triton's wheel). No GPU needed.

What is kept: no spills; the hot global loads and stores are 16-byte vectors (at most a few 16-bit scalar loads a
program: a group's shift, a channel's weight and bias); at least two resident programs per SM for the copy-like
kernels; the number of passes over each tensor the design promises; int64 frame offsets."""
import re
import sys

import pytest
import torch

import kernels  # noqa: F401  (loads every kernel module)
from bench import flops
from kernels import _static
from test_causal_pad3d import _addptr_offsets

cp, gn = sys.modules["kernels.causal_pad3d"], sys.modules["kernels.group_norm_silu_pad"]
rp, ea = sys.modules["kernels.rope3d"], sys.modules["kernels.expert_adaln"]


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, device="meta", dtype=dtype)


def _vectorized(b: _static.Built, scalar_loads: int = 0, scalar_stores: int = 0):
    """Every bf16 block access is a 128-bit vector: no 64-bit loads, 16-bit loads and stores only for the kernel's
    scalar accesses."""
    assert b.ldg[128] >= 1 and b.ldg[64] == 0 and b.ldg[16] <= scalar_loads, (b.name, b.ldg)
    assert b.stg[16] <= scalar_stores and b.stg[64] == 0 and (b.stg[128] >= 1 or b.stg[32]), (b.name, b.stg)


def _int64_frames(b: _static.Built):
    for ptr in list(b.reads) + list(b.writes):
        offsets = _addptr_offsets(b.ttir, ptr)
        assert offsets and set(offsets) == {"i64"}, (b.name, ptr, offsets)


def _int64_blocks(b: _static.Built):
    """The single-program kernels add per-channel (block) frame offsets to splatted pointers: those are int64, the
    offsets inside a frame int32 (the compiler splits the sum into one addptr each)."""
    widths = re.findall(r"tt\.addptr %\S+, %\S+ : tensor<[^,]*!tt\.ptr<\w+>>, tensor<[0-9x]+x(i\d+)>", b.ttir)
    assert set(widths) == {"i64", "i32"} and widths.count("i64") >= widths.count("i32"), (b.name, widths)


GN_PARAMS = {"w_ptr", "b_ptr", "dw_ptr", "db_ptr"}   # (C,) tensors, loaded / stored one element a channel


def _big_passes(builds):
    """_static.passes without the (C,) weight and bias and their gradients (whether their per-channel accesses
    count as blocks depends on how a kernel spells them; bytes: 2 C)."""
    return {k: v for k, v in _static.passes(builds).items() if k not in GN_PARAMS}


VAE = (1, 128, 9, 480, 720)       # the decoder's first chunk at full resolution (3 latents -> 9 frames)


def test_resident_programs_formula():
    assert _static.resident_programs(32, 0, 8) == 8          # 64 warps / 8
    assert _static.resident_programs(128, 0, 8) == 2         # 65,536 / (128 x 256 threads)
    assert _static.resident_programs(255, 0, 4) == 2         # 255 -> 256 registers a thread, 8 KB a warp
    assert _static.resident_programs(16, 100 * 1024, 1) == 2  # 228 KB of shared memory, 1 KB reserved a block
    assert _static.resident_programs(16, 0, 1) == 32         # the block limit


def test_causal_pad3d_forward_is_one_vectorized_pass():
    B, C, T, H, W = VAE
    x = _meta(*VAE)
    (b,) = _static.inspect_launcher(cp.causal_pad3d_fwd, x, 3, None, 0, 0, "first")
    assert b.name == "_causal_pad3d_flat_fwd_kernel" and not b.spills and b.resident >= 2
    _vectorized(b)
    _int64_frames(b)
    assert _static.passes([b]) == {"x_ptr": (1, 0), "out_ptr": (0, 1), "nc_ptr": (0, 1)}
    assert b.bytes_moved == flops.causal_pad3d_bytes(B, C, T, H, W, 3, (0, 0))["fwd"]
    # a later chunk: the cache in front; 8 frames
    (b,) = _static.inspect_launcher(cp.causal_pad3d_fwd, _meta(1, 128, 8, 480, 720), 3, _meta(1, 128, 2, 480, 720),
                                    0, 0, "first")
    _vectorized(b)
    assert _static.passes([b]) == {"x_ptr": (1, 0), "cache_ptr": (1, 0), "out_ptr": (0, 1), "nc_ptr": (0, 1)}


def test_causal_pad3d_backward_is_vectorized():
    B, C, T, H, W = VAE
    (b,) = _static.inspect_launcher(cp.causal_pad3d_bwd, _meta(B, C, T + 2, H, W), _meta(B, C, 2, H, W), T, 3, 0, 0,
                                    "first", False)
    assert not b.spills and b.resident >= 2
    _vectorized(b)
    _int64_frames(b)
    assert _static.passes([b]) == {"dout_ptr": (1, 0), "dnc_ptr": (1, 0), "dx_ptr": (0, 1)}


def test_group_norm_silu_pad_forward():
    """Statistics (one read of x), then every apply program merges its group's partials and reads x, zq_scale,
    zq_shift once and writes out and new_cache once: two launches, every block access 16 bytes wide, no division
    per element."""
    B, C, T, H, W = VAE
    x, w = _meta(*VAE), _meta(C)
    builds = _static.inspect_launcher(gn.group_norm_silu_pad_fwd, x, 32, w, w, 1e-6, 3, None, 0, 0, x, x, True)
    assert [b.name for b in builds] == ["_gn_stats_kernel", "_gn_apply_flat_kernel"]
    stats, apply = builds
    for b in builds:
        assert not b.spills and b.resident >= 2, (b.name, b.n_regs)
    _vectorized(stats, scalar_loads=1)                          # the group's shift
    _vectorized(apply, scalar_loads=3)                          # the shift, the channel's weight and bias
    for b in (stats, apply):
        _int64_frames(b)
        assert not re.search(r"arith\.(div|rem)[su]i .* : tensor<", b.ttir), b.name   # scalars only
    # partials: stored as scalars, read by every apply program (from L2); the statistics: 3 floats a group
    assert _static.passes(builds) == {"x_ptr": (2, 0), "zs_ptr": (1, 0), "zb_ptr": (1, 0), "out_ptr": (0, 1),
                                      "nc_ptr": (0, 1), "part_ptr": (1, 0), "stats_ptr": (0, 1), "rstd_ptr": (0, 1)}
    side = apply.reads["part_ptr"] + apply.writes["stats_ptr"] + apply.writes["rstd_ptr"]
    assert stats.bytes_moved + apply.bytes_moved - side + 4 * C == \
        flops.group_norm_silu_pad_bytes(B, C, T, H, W, 3, (0, 0), zq=True)["fwd"]   # + weight, bias


def test_group_norm_silu_pad_backward():
    """Two passes over dout, x and zq (the group means must be complete before any dx), each 16 bytes wide; the
    second merges the group's partials itself (no launch between the passes) and stores dweight / dbias."""
    B, C, T, H, W = VAE
    x, w = _meta(*VAE), _meta(C)
    stats, rstd = _meta(B, 32, 2, dtype=torch.float32), _meta(B, 32, dtype=torch.float32)
    builds = _static.inspect_launcher(gn.group_norm_silu_pad_bwd, _meta(B, C, T + 2, H, W), None, x, w, w, x, x,
                                      stats, rstd, 32, 3, False, 0, 0, True)
    assert [b.name for b in builds] == ["_gn_bwd_kernel"] * 2
    for b in builds:
        assert not b.spills and b.resident >= 2, (b.name, b.n_regs)
        _int64_frames(b)
    _vectorized(builds[0], scalar_loads=2)                      # the channel's weight and bias
    _vectorized(builds[1], scalar_loads=6, scalar_stores=2)     # + the group's weights; dweight, dbias
    assert _big_passes(builds) == {"dout_ptr": (2, 0), "x_ptr": (2, 0), "zs_ptr": (2, 0), "zb_ptr": (2, 0),
                                   "dzs_ptr": (0, 1), "dzb_ptr": (0, 1), "dx_ptr": (0, 1), "part_ptr": (1, 0)}


# the largest chunk of the single-program path: 4 channels (128 / 32 groups) x 2 frames x 32 x 32 = FUSED_MAX;
# one frame more (3, rounded up to 4) is past it
FITS = (1, 128, 2, 32, 32)


@pytest.mark.parametrize("T", [2, 3])
def test_group_norm_silu_pad_single_program_at_the_threshold(T):
    """At FUSED_MAX: one launch forward (x read once, out / new_cache written once) and one backward (dout, x, zq
    read once; dcache gathered in the same program), no spills; one frame more: the two-launch paths."""
    B, C, _, H, W = FITS
    assert gn.fused_blocks(C // 32, 2, 2, H * W) and gn.fused_blocks(C // 32, 3, 2, H * W) is None
    x, w = _meta(B, C, T, H, W), _meta(C)
    stats, rstd = _meta(B, 32, 2, dtype=torch.float32), _meta(B, 32, dtype=torch.float32)
    fwd = _static.inspect_launcher(gn.group_norm_silu_pad_fwd, x, 32, w, w, 1e-6, 3, None, 0, 0, x, x, True)
    bwd = _static.inspect_launcher(gn.group_norm_silu_pad_bwd, _meta(B, C, T + 2, H, W), _meta(B, C, 2, H, W), x,
                                   w, w, x, x, stats, rstd, 32, 3, True, 0, 0, True)
    if T == 3:
        assert [b.name for b in fwd] == ["_gn_stats_kernel", "_gn_apply_flat_kernel"]
        assert [b.name for b in bwd] == ["_causal_pad3d_flat_bwd_kernel"] + ["_gn_bwd_kernel"] * 2
        return
    assert [b.name for b in fwd + bwd] == ["_gn_fused_fwd_kernel", "_gn_fused_bwd_kernel"]
    for b in fwd + bwd:
        assert not b.spills, (b.name, b.n_regs)
        _int64_blocks(b)
        assert not re.search(r"arith\.(div|rem)[su]i .* : tensor<", b.ttir), b.name
    _vectorized(fwd[0], scalar_loads=16)                        # the shift, the (BLOCK_C,) weights and biases
    _vectorized(bwd[0], scalar_loads=16, scalar_stores=4)       # the weights and biases; dweight, dbias
    assert _big_passes(fwd) == {"x_ptr": (1, 0), "zs_ptr": (1, 0), "zb_ptr": (1, 0), "out_ptr": (0, 1),
                                "nc_ptr": (0, 1)}
    assert fwd[0].bytes_moved == flops.group_norm_silu_pad_bytes(B, C, T, H, W, 3, (0, 0), zq=True, fits=True)["fwd"]
    assert _big_passes(bwd) == {"dout_ptr": (1, 0), "dnc_ptr": (1, 0), "x_ptr": (1, 0), "zs_ptr": (1, 0),
                                   "zb_ptr": (1, 0), "dzs_ptr": (0, 1), "dzb_ptr": (0, 1), "dx_ptr": (0, 1),
                                   "dc_ptr": (0, 1)}


@pytest.mark.parametrize("backward", [False, True])
def test_rope3d_on_the_strided_qkv_slice(backward):
    """The model feeds rope3d q = qkv.view(B, S, 3, H, Dh)[:, :, 0] (a row stride of 3 H Dh): still 16-byte rows,
    no spills."""
    B, S, H, Dh = 2, 226 + 13 * 30 * 45, 30, 64
    q = _meta(B, S, 3, H, Dh)[:, :, 0]
    start, step, w = _meta(3, dtype=torch.float32), _meta(3, dtype=torch.float32), _meta(Dh)
    args = (q, 226, (13, 30, 45), start, step, 10000.0, rp.default_axes_dim(Dh), w, w, 1e-6)
    (b,) = _static.inspect_launcher(rp.rope3d_bwd, _meta(B, S, H, Dh), *args) if backward else \
        _static.inspect_launcher(rp.rope3d_fwd, *args)
    assert not b.spills and b.ldg[16] == 0 and b.stg[16] == 0 and b.ldg[128] >= 1, (b.ldg, b.stg)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("model", ["2b", "5b"])
def test_rope3d_q_and_k_in_one_launch(model, backward):
    """q and k as one (B, S, 2H, Dh) view of the QKV output with (2, Dh) weights (torch.stack([norm_q, norm_k])): one
    launch, a program per weight row's heads (grid axis 1 = 2), still 16-byte rows and no spills; the 2B has no
    RoPE (every token "text"), the 5B its 13x30x45 grid at 768x1360."""
    H, grid = (30, (0, 0, 0)) if model == "2b" else (48, (13, 30, 45))
    B, Dh, S = 2, 64, 226 + 13 * 30 * 45
    qk = _meta(B, S, 3 * H * Dh).unflatten(-1, (3, H, Dh))[:, :, :2].flatten(2, 3)
    start, step, w = _meta(3, dtype=torch.float32), _meta(3, dtype=torch.float32), _meta(2, Dh)
    text_len = S if model == "2b" else 226
    args = (qk, text_len, grid, start, step, 10000.0, rp.default_axes_dim(Dh), w, w, 1e-6)
    (b,) = _static.inspect_launcher(rp.rope3d_bwd, _meta(B, S, 2 * H, Dh), *args) if backward else \
        _static.inspect_launcher(rp.rope3d_fwd, *args)
    assert b.grid[1:] == [2] and not b.spills and b.resident >= 4, (b.grid, b.n_regs)
    assert b.ldg[16] == 0 and b.stg[16] == 0 and b.ldg[128] >= 1, (b.ldg, b.stg)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("groups", [1, 2], ids=["q", "q_and_k"])
def test_rope3d_packed(groups, backward):
    """A packed pair of 5B videos (13 and 7 latent frames at 768x1360, 226 text tokens each; VARLEN): grid (token
    blocks of the longer, 2 segments[, 2 groups]), the segment scalars loaded (32-bit), the rows still 16 bytes, no
    spills, >= 4 programs resident."""
    from kernels import Segments
    seg = Segments([226, 226], [(13, 30, 45), (7, 30, 45)], device="meta")
    H, Dh = 48, 64
    x = _meta(1, seg.total, 3 * H * Dh).unflatten(-1, (3, H, Dh))[:, :, :groups].flatten(2, 3)
    w = _meta(Dh) if groups == 1 else _meta(groups, Dh)
    layout = (seg.cu_seqlens, seg.text_lens_t, seg.grids_t, seg.max_len)
    args = (x, 0, [0, 0, 0], seg.start_t, seg.step_t, 10000.0, rp.default_axes_dim(Dh), w, w, 1e-6, 0, layout)
    (b,) = _static.inspect_launcher(rp.rope3d_bwd, _meta(*x.shape), *args) if backward else \
        _static.inspect_launcher(rp.rope3d_fwd, *args)
    cfg = rp.rope3d_config(H, Dh, backward)
    assert b.grid == [-(-seg.max_len // cfg["BLOCK_S"]), 2] + ([groups] if groups > 1 else []), b.grid
    assert not b.spills and b.resident >= 4, (b.n_regs, b.resident)
    assert b.ldg[16] == 0 and b.stg[16] == 0 and b.ldg[128] >= 1, (b.ldg, b.stg)


def test_expert_adaln_residual_backward():
    """The row vectors are 16-byte copies (LDGSTS, the pipeline's prefetch); the 16-bit loads are the rows' shifts
    x[0], one per row loop (two expert segments)."""
    B, S, D = 2, 226 + 13 * 30 * 45, 3072
    x, mod, w, stats = _meta(B, S, D), _meta(B, 2, D), _meta(D), _meta(B, S, dtype=torch.float32)
    (b,) = _static.inspect_launcher(ea.expert_adaln_bwd, x, x, x, stats, stats, x, mod, mod, 226, w, w)
    assert not b.spills and b.ldg[16] <= 4 and b.stg[16] == 0 and b.ldg[128] >= 1, (b.ldg, b.stg)


def test_static_table_runs_on_cpu(capsys):
    from bench.cli import main
    assert main(["kernels", "--static", "--filter", "causal_pad3d 1x512x3x60x90", "--models", "2b"]) == 0
    text = capsys.readouterr().out
    assert "| causal_pad3d | 1x512x3x60x90 pad0 | fwd | _causal_pad3d_flat_fwd_kernel |" in text
    assert main(["attention", "--static"]) == 2


def test_padded_2d_kernels_compile_without_spills_and_with_int64_frames():
    """The 2-D kernels (a spatial pad, not how the VAE calls the ops) at the VAE's largest chunk: no spills, int64
    frame offsets. Their accesses are 2-byte scalars at a padded row pitch, by design (see causal_pad3d)."""
    B, C, T, H, W = 1, 128, 8, 480, 720
    x, cache, w = _meta(B, C, T, H, W), _meta(B, C, 2, H, W), _meta(C)
    dout, dnc = _meta(B, C, T + 2, H + 2, W + 2), _meta(B, C, 2, H, W)
    stats, rstd = _meta(B, 32, 2, dtype=torch.float32), _meta(B, 32, dtype=torch.float32)
    builds = (_static.inspect_launcher(cp.causal_pad3d_fwd, x, 3, cache, 1, 1, "first")
              + _static.inspect_launcher(cp.causal_pad3d_bwd, dout, dnc, T, 3, 1, 1, "replicate", False)
              + _static.inspect_launcher(gn.group_norm_silu_pad_fwd, x, 32, w, w, 1e-6, 3, cache, 1, 1, x, x, True)[1:]
              + _static.inspect_launcher(gn.group_norm_silu_pad_bwd, dout, dnc, x, w, w, x, x, stats, rstd, 32, 3,
                                         True, 1, 1, True))
    assert [b.name for b in builds] == ["_causal_pad3d_fwd_kernel", "_causal_pad3d_bwd_kernel", "_gn_apply_kernel",
                                        "_causal_pad3d_bwd_kernel", "_gn_bwd_kernel", "_gn_bwd_kernel"]
    for b in builds:
        assert not b.spills, (b.name, b.n_regs)
        _int64_frames(b)
