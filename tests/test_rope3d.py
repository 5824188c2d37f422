"""rope3d: q/k LayerNorm + 3D RoPE. Triton kernels (in the interpreter) against the fp32 reference, diffusers 0.42.1,
torch.library checks, torch.compile, determinism, and the sm_90 AOT build (spills, 64-bit offsets)."""
import importlib
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from conftest import assert_parity
from kernels._aot import compile_sm90
from kernels._triton_common import cast_rtne

R = importlib.import_module("kernels.rope3d")   # the module; `kernels.rope3d` the attribute is the function
rope3d, rope3d_ref, rope3d_table = R.rope3d, R.rope3d_ref, R.rope3d_table

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _x(B, S, H, Dh, dtype, layout):
    """Fresh random x; "qkv": the k slice of a fused (B, S, 3, H, Dh) projection, as the model passes it."""
    if layout == "qkv":
        return torch.randn(B, S, 3, H, Dh).to(dtype)[:, :, 1]
    if layout == "bhsd":                                # diffusers' (B, H, S, Dh) layout, transposed
        return torch.randn(B, H, S, Dh).to(dtype).transpose(1, 2)
    if layout == "expand":                              # stride 0 over batch and heads
        return torch.randn(1, S, 1, Dh).to(dtype).expand(B, S, H, Dh)
    return torch.randn(B, S, H, Dh).to(dtype)


def _plain(x, text_len, grid, start, step, theta, axes_dim, weight, bias, eps):
    """What diffusers does in x.dtype: nn.LayerNorm in x.dtype, then apply_rotary_emb (fp32 math, cast back)."""
    Dh = x.shape[-1]
    if weight is not None or bias is not None:
        x = F.layer_norm(x, (Dh,), weight, bias, eps)
    cos, sin = rope3d_table(grid, start, step, theta, axes_dim or R.default_axes_dim(Dh))
    vis = x[:, text_len:]
    rot = torch.stack([-vis[..., 1::2], vis[..., 0::2]], dim=-1).flatten(-2)
    vis = (vis.float() * cos[None, :, None] + rot.float() * sin[None, :, None]).to(x.dtype)
    return torch.cat([x[:, :text_len], vis], dim=1)


def _run(fn, x, dy, weight, bias, args, kwargs):
    """Forward and the gradients of every given input, for dy."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    out = fn(leaves[0], *args, weight=leaves[1], bias=leaves[2], **kwargs)
    live = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, live, dy))
    return out.detach(), [next(grads) if t is not None else None for t in leaves]


CASES = {
    # name: B, H, Dh, axes_dim, text_len, grid, start, step, norm ("wb", "w", "b", None), x layout
    "cogvideox_small": (2, 3, 64, None, 7, (2, 3, 5), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "wb", "qkv"),
    "dh32_text0_t1": (1, 5, 32, (8, 12, 12), 0, (1, 3, 7), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), None, "contig"),
    "text1_weight_only": (2, 2, 64, None, 1, (2, 2, 3), (0.0, 2.0, 0.0), (1.0, 0.51995, 1.0), "w", "qkv"),
    "long_text_fractional": (1, 3, 64, None, 21, (1, 2, 4), (0.0, 2.0, 0.5), (1.0, 4.2, 9.75), "wb", "bhsd"),
    "dh48_not_pow2_bias_only": (2, 17, 48, (12, 18, 18), 2, (3, 1, 2), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "b", "qkv"),
    "expanded_x": (2, 4, 64, None, 5, (1, 2, 2), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "wb", "expand"),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_parity_forward_backward(triton_kernels, case, dtype):
    B, H, Dh, axes_dim, text_len, grid, start, step, norm, layout = CASES[case]
    S = text_len + grid[0] * grid[1] * grid[2]
    x = _x(B, S, H, Dh, dtype, layout)
    weight = (1 + 0.3 * torch.randn(Dh)).to(dtype) if norm in ("wb", "w") else None
    bias = (0.3 * torch.randn(Dh)).to(dtype) if norm in ("wb", "b") else None
    dy = torch.randn(B, S, H, Dh).to(dtype)
    args, kw = (text_len, grid), dict(start=start, step=step, axes_dim=axes_dim)
    f32 = [t.float() if t is not None else None for t in (x, weight, bias)]

    out, grads = _run(rope3d, x, dy, weight, bias, args, kw)
    ref, ref_grads = _run(rope3d_ref, *f32[:1], dy.float(), *f32[1:], args, kw)
    plain, plain_grads = None, [None] * 3
    if dtype != torch.float32:
        def plain_fn(x, weight=None, bias=None):
            return _plain(x, text_len, grid, start, step, 10000.0, axes_dim, weight, bias, 1e-6)
        plain, plain_grads = _run(plain_fn, x, dy, weight, bias, (), {})
    assert out.dtype == dtype and out.is_contiguous()
    assert_parity(out, ref, plain, name="out")
    for name, g, r, p in zip(("dx", "dweight", "dbias"), grads, ref_grads, plain_grads):
        if r is None:
            continue
        assert g.dtype == dtype
        assert_parity(g, r, p, name=name)


def test_text_tokens_pass_through_and_vision_rotated(triton_kernels):
    x = torch.randn(2, 4 + 6, 3, 64)
    out = rope3d(x, 4, (1, 2, 3))
    assert torch.equal(out[:, :4], x[:, :4])          # no norm, no rotation: text rows are copied bit for bit
    assert not torch.allclose(out[:, 5:], x[:, 5:])   # every vision token but (0, 0, 0) moves
    assert torch.allclose(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)   # a rotation keeps the norm


@pytest.mark.parametrize("norm", [False, True])
def test_stride0_gradient(triton_kernels, norm):
    """.sum().backward() hands backward an expanded, stride-0 dy."""
    x = _x(2, 3 + 12, 3, 64, torch.float32, "qkv")
    weight, bias = (torch.randn(64), torch.randn(64)) if norm else (None, None)
    grads = []
    for fn in (rope3d, rope3d_ref):
        leaves = [t.detach().requires_grad_() for t in (x, weight, bias) if t is not None]
        fn(leaves[0], 3, (1, 3, 4), weight=leaves[1] if norm else None,
           bias=leaves[2] if norm else None).sum().backward()
        grads.append([t.grad for t in leaves])
    for ours, ref in zip(*grads):
        assert_parity(ours, ref)


def test_every_output_element_written(triton_kernels, monkeypatch):
    """Poison every buffer the launchers allocate (out, dx, the dweight/dbias partials) with NaN: tails in S, H and
    Dh < BLOCK_D must all be written."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    x = _x(2, 3 + 10, 5, 48, torch.float32, "qkv")
    w, b, dy = torch.randn(48), torch.randn(48), torch.randn(2, 13, 5, 48)
    args, kw = (3, (1, 2, 5)), dict(axes_dim=(12, 18, 18))
    out, grads = _run(rope3d, x, dy, w, b, args, kw)
    ref, ref_grads = _run(rope3d_ref, x, dy, w, b, args, kw)
    assert_parity(out, ref)
    for g, r in zip(grads, ref_grads):
        assert_parity(g, r)


@triton.jit
def _sincos_kernel(A, SIN, COS, N: tl.constexpr):
    offs = tl.arange(0, N)
    sin, cos = R._sincos(tl.load(A + offs))
    tl.store(SIN + offs, sin)
    tl.store(COS + offs, cos)


@pytest.mark.parametrize("limit", [4.0, 100.0, 8192.0])
def test_sincos_accuracy(limit):
    """The in-kernel sin/cos (own range reduction + polynomials) against float64, over the documented range."""
    n = 1 << 14
    a = (torch.rand(n) * 2 - 1) * limit
    sin, cos = torch.empty(n), torch.empty(n)
    _sincos_kernel[(1,)](a, sin, cos, N=n)
    assert (sin.double() - a.double().sin()).abs().max() < 2e-7
    assert (cos.double() - a.double().cos()).abs().max() < 2e-7


@triton.jit
def _cast_kernel(X, Y, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, cast_rtne(tl.load(X + offs), Y.dtype.element_ty))


# fp32 bit patterns where truncation, a naive rounding add or the interpreter's own cast goes wrong: ties to even
# (down and up), just above a tie, the largest finite fp32 (rounds to inf), +-inf, NaNs with payload only in the
# low bits or all bits set (the +0x7FFF add wraps or carries into inf), subnormals (the interpreter flushes them), -0
EDGE_BITS = [0x3F808000, 0x3F818000, 0x3F808001, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000, 0x7F800001,
             0xFF800001, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0x00000001, 0x00018000, 0x80008000, 0x80000000]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cast_rtne_matches_torch(dtype):
    """The shared store cast (kernels._triton_common.cast_rtne) gives torch's round-to-nearest-even cast, the GPU's,
    bit for bit in the interpreter: edge cases and random values over the whole exponent range."""
    edge = torch.tensor(EDGE_BITS, dtype=torch.int64).to(torch.int32).view(torch.float32)
    n = 1024 - len(EDGE_BITS)
    x = torch.cat([edge, torch.randn(n) * 2.0 ** torch.randint(-140, 120, (n,))])
    y = torch.empty(1024, dtype=dtype)
    with np.errstate(over="ignore"):                   # fp16: values beyond 65504 become inf, as they should
        _cast_kernel[(1,)](x, y, N=1024)
    want = x.to(dtype)
    nan = want.isnan()
    assert torch.equal(y.isnan(), nan)
    assert torch.equal(y[~nan].view(torch.int16 if dtype != torch.float32 else torch.int32),
                       want[~nan].view(torch.int16 if dtype != torch.float32 else torch.int32))


def _linspace_start_step(lo, hi, n):
    return float(lo), (float(hi) - float(lo)) / (n - 1) if n > 1 else 1.0


@pytest.mark.parametrize("kernels", ["triton", "torch"])
@pytest.mark.parametrize("crops,grid", [
    (((0, 0), (3, 5)), (2, 3, 5)),        # native resolution: integer positions
    (((2, 0), (27, 45)), (2, 6, 8)),      # the 5B at 768x1360 style crop: fractional positions up to ~39
], ids=["integer", "linspace"])
def test_matches_diffusers(monkeypatch, kernels, crops, grid):
    """Against diffusers' own get_3d_rotary_pos_embed + apply_rotary_emb (after its q/k LayerNorm)."""
    emb = pytest.importorskip("diffusers.models.embeddings", reason="diffusers (the test extra) is not installed")
    monkeypatch.setenv("COGVIDEOX_KERNELS", kernels)
    T, Hg, Wg = grid
    B, H, Dh, text_len = 2, 2, 64, 5
    cos, sin = emb.get_3d_rotary_pos_embed(Dh, crops, (Hg, Wg), T, use_real=True)
    q = torch.randn(B, H, text_len + T * Hg * Wg, Dh)                  # diffusers' (B, heads, S, Dh)
    w, b = 1 + 0.2 * torch.randn(Dh), 0.2 * torch.randn(Dh)
    q_ln = F.layer_norm(q, (Dh,), w, b, 1e-6)
    expected = torch.cat([q_ln[:, :, :text_len], emb.apply_rotary_emb(q_ln[:, :, text_len:], (cos, sin))], dim=2)

    (top, left), (bottom, right) = crops
    t0, dt = _linspace_start_step(0, T * (T - 1) / T, T)
    h0, dh = _linspace_start_step(top, bottom * (Hg - 1) / Hg, Hg)
    w0, dw = _linspace_start_step(left, right * (Wg - 1) / Wg, Wg)
    out = rope3d(q.transpose(1, 2), text_len, grid, start=(t0, h0, w0), step=(dt, dh, dw), weight=w, bias=b)
    assert_parity(out.transpose(1, 2), expected, name="vs diffusers")


@pytest.mark.parametrize("norm", [False, True])
def test_cpu_default_runs_reference(monkeypatch, norm):
    """Without COGVIDEOX_KERNELS the CPU path is the reference: forward bit for bit, backward (pure torch, fp32)
    equal to autograd through the reference."""
    monkeypatch.delenv("COGVIDEOX_KERNELS", raising=False)
    x = _x(2, 3 + 6, 2, 64, torch.float32, "qkv")
    w, b = (torch.randn(64), torch.randn(64)) if norm else (None, None)
    assert torch.equal(rope3d(x.bfloat16(), 3, (1, 2, 3)), rope3d_ref(x.bfloat16(), 3, (1, 2, 3)))
    dy = torch.randn(2, 9, 2, 64)
    out, grads = _run(rope3d, x, dy, w, b, (3, (1, 2, 3)), {})
    ref, ref_grads = _run(rope3d_ref, x, dy, w, b, (3, (1, 2, 3)), {})
    assert torch.equal(out, ref)
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None)
        if g is not None:
            assert_parity(g, r)


def test_backward_deterministic(triton_kernels):
    x = _x(2, 2 + 24, 5, 64, torch.bfloat16, "qkv")
    w, b, dy = torch.randn(64).bfloat16(), torch.randn(64).bfloat16(), torch.randn(2, 26, 5, 64).bfloat16()
    first = _run(rope3d, x, dy, w, b, (2, (2, 3, 4)), {})[1]
    second = _run(rope3d, x, dy, w, b, (2, (2, 3, 4)), {})[1]
    for g1, g2 in zip(first, second):
        assert torch.equal(g1.view(torch.int16), g2.view(torch.int16))


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_opcheck(monkeypatch, kernels):
    monkeypatch.setenv("COGVIDEOX_KERNELS", kernels)
    x = _x(1, 2 + 6, 3, 32, torch.float32, "qkv").requires_grad_()
    w, b = torch.randn(32, requires_grad=True), torch.randn(32, requires_grad=True)
    start, step = torch.tensor([0.0, 0.5, 0.0]), torch.tensor([1.0, 1.0, 0.75])
    common = (2, [1, 2, 3], start, step, 10000.0, [8, 12, 12])
    torch.library.opcheck(torch.ops.cogvideox.rope3d.default, (x, *common, w, b, 1e-6))
    torch.library.opcheck(torch.ops.cogvideox.rope3d.default, (x, *common, None, None, 1e-6))
    dy = torch.randn(1, 8, 3, 32)
    torch.library.opcheck(torch.ops.cogvideox.rope3d_bwd.default, (dy, x.detach(), *common, w.detach(), None, 1e-6))
    torch.library.opcheck(torch.ops.cogvideox.rope3d_bwd.default, (dy, None, *common, None, None, 1e-6))
    # a context-parallel shard: tokens [1, 9) of a 2 + 1*2*4 sequence
    shard = (2, [1, 2, 4], start, step, 10000.0, [8, 12, 12])
    torch.library.opcheck(torch.ops.cogvideox.rope3d.default, (x, *shard, w, b, 1e-6, 1))
    torch.library.opcheck(torch.ops.cogvideox.rope3d_bwd.default, (dy, x.detach(), *shard, w.detach(), b.detach(),
                                                                   1e-6, 1))


def test_compile_fullgraph_three_lengths(triton_kernels):
    """Zero graph breaks, forward and backward, over three sequence lengths; automatic dynamic -> <= 2 compiles."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()

    def f(x, w, b, grid):
        return rope3d(x, 2, grid, step=(1.0, 0.5, 1.0), weight=w, bias=b) * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    w, b = torch.randn(32), torch.randn(32)
    for T in (1, 2, 3):
        grid = (T, 2, 3)
        x = _x(1, 2 + 6 * T, 2, 32, torch.float32, "qkv")
        dy = torch.randn(1, 2 + 6 * T, 2, 32)
        out, grads = _run(lambda *a, **k: compiled(a[0], k["weight"], k["bias"], grid), x, dy, w, b, (), {})
        ref, ref_grads = _run(lambda *a, **k: f(a[0], k["weight"], k["bias"], grid), x, dy, w, b, (), {})
        assert torch.equal(out, ref)
        for g, r in zip(grads, ref_grads):
            assert torch.equal(g, r)
    assert sum(counters["graph_break"].values()) == 0
    assert 1 <= counters["stats"]["unique_graphs"] <= 2


# (grid, start, step) as CogVideoX 1.0 builds them at three aspect ratios (cogvideox.transformer.rope_positions):
# fractional h / w positions that change with the resolution, no axis of size 1 (nothing for Dynamo to specialize)
POSITIONS = [
    ((2, 3, 5), (0.0, 0.0, 1.0), (1.0, 1.0, 0.7)),
    ((3, 4, 2), (0.0, 2.0, 0.0), (1.0, 0.51995, 1.5)),
    ((2, 2, 6), (0.0, 1.0, 0.5), (1.0, 4.2, 0.8125)),
]


@pytest.mark.parametrize("kernels,given", [("triton", "tensor"), ("torch", "tensor"), ("triton", "floats")])
def test_compile_positions_do_not_recompile(monkeypatch, kernels, given):
    """torch.compile(fullgraph=True, dynamic=True) over three grids and three (start, step): zero graph breaks and
    ONE graph, forward and backward equal to eager, with the Triton kernels and with the op's reference path.
    Positions given as tensors are graph inputs; given as floats, Dynamo keeps them symbolic too (they reach the
    op as a tensor built from them). A position that reached the op as a constant would recompile (a second
    graph) or differ from eager. (rope3d_ref traced under compile with tensor positions: test_transformer's
    compile_blocks test with the references.)"""
    monkeypatch.setenv("COGVIDEOX_KERNELS", kernels)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()

    def f(x, w, b, grid, start, step):
        return rope3d(x, 3, grid, start, step, weight=w, bias=b) * 2.0

    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    w, b = torch.randn(32), torch.randn(32)
    for grid, start, step in POSITIONS:
        if given == "tensor":
            start, step = torch.tensor([start, step]).unbind(0)     # the rows of one (2, 3), as the model passes
        S = 3 + grid[0] * grid[1] * grid[2]
        x, dy = _x(2, S, 2, 32, torch.float32, "qkv"), torch.randn(2, S, 2, 32)
        out, grads = _run(lambda *a, **k: compiled(a[0], k["weight"], k["bias"], grid, start, step), x, dy, w, b,
                          (), {})
        ref, ref_grads = _run(lambda *a, **k: f(a[0], k["weight"], k["bias"], grid, start, step), x, dy, w, b,
                              (), {})
        assert torch.equal(out, ref)
        for g, r in zip(grads, ref_grads):
            assert torch.equal(g, r)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, "recompiled: positions or sizes were specialized"
    torch._dynamo.reset()


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_tensor_positions_equal_floats(monkeypatch, kernels):
    """Eager: fp32 tensor positions (rows of a (2, 3), or non-contiguous) give bit for bit what floats give, forward
    and backward; the table of rope3d_ref from tensors equals the one from floats."""
    monkeypatch.setenv("COGVIDEOX_KERNELS", kernels)
    grid, start, step = POSITIONS[1]
    S = 3 + grid[0] * grid[1] * grid[2]
    x, dy = _x(2, S, 3, 64, torch.float32, "qkv"), torch.randn(2, S, 3, 64)
    w, b = torch.randn(64), torch.randn(64)
    expected, expected_grads = _run(rope3d, x, dy, w, b, (3, grid, start, step), {})
    rows = torch.tensor([start, step]).unbind(0)
    columns = torch.tensor([start, step]).t().unbind(1)                     # stride 2: copied by the launcher
    for given in (rows, columns):
        assert given[0].shape == (3,)
        out, grads = _run(rope3d, x, dy, w, b, (3, grid, *given), {})
        assert torch.equal(out, expected)
        for g, e in zip(grads, expected_grads):
            assert torch.equal(g, e)
    for t, e in zip(rope3d_table(grid, *rows), rope3d_table(grid, start, step)):
        assert torch.equal(t, e)


# Context-parallel shards of one joint sequence (text_len = 5, grid (2, 2, 3): S = 17): the shards' boundaries.
# Offsets 0, 3 (mid-text: a shard wholly inside the text), 5 (exactly text_len), 9 (mid-vision), uneven sizes;
# a shard straddling the text/vision boundary; one-token shards.
SHARDINGS = [(0, 3, 5, 9, 17), (0, 7, 8, 17), (0, 1, 2, 6, 16, 17)]


@pytest.mark.parametrize("norm", [True, False], ids=["norm", "nonorm"])
@pytest.mark.parametrize("bounds", SHARDINGS, ids=lambda b: "-".join(map(str, b)))
@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_context_parallel_offset(monkeypatch, kernels, bounds, norm):
    """rope3d(x[:, lo:hi], offset=lo) is rope3d(x)[:, lo:hi] bit for bit in fp32 (each token sees the same
    arithmetic), forward and input gradient, on the reference path and in the interpreter; dweight / dbias summed
    over the shards equal the full ones (1e-5 relative)."""
    monkeypatch.setenv("COGVIDEOX_KERNELS", kernels)
    text_len, grid, kw = 5, (2, 2, 3), dict(start=(0.0, 1.0, 0.5), step=(1.0, 0.75, 1.25))
    x = _x(2, 17, 3, 64, torch.float32, "qkv").requires_grad_()
    w = (1 + 0.3 * torch.randn(64)).requires_grad_() if norm else None
    b = (0.3 * torch.randn(64)).requires_grad_() if norm else None
    dy = torch.randn(2, 17, 3, 64)
    leaves = [t for t in (x, w, b) if t is not None]
    full = rope3d(x, text_len, grid, weight=w, bias=b, **kw)
    full_grads = torch.autograd.grad(full, leaves, dy)
    shards = [rope3d(x[:, lo:hi], text_len, grid, weight=w, bias=b, offset=lo, **kw)
              for lo, hi in zip(bounds[:-1], bounds[1:])]
    grads = torch.autograd.grad(shards, leaves, [dy[:, lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])])
    assert torch.equal(torch.cat(shards, dim=1), full)
    assert torch.equal(grads[0], full_grads[0])
    for name, g, r in zip(("dweight", "dbias"), grads[1:], full_grads[1:]):
        assert_parity(g, r, name=name)
    # the reference itself, shard by shard
    ref = rope3d_ref(x.detach(), text_len, grid, weight=w, bias=b, **kw)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        part = rope3d_ref(x[:, lo:hi].detach(), text_len, grid, weight=w, bias=b, offset=lo, **kw)
        assert torch.equal(part, ref[:, lo:hi])


@pytest.mark.parametrize("offset, S, ok", [(0, 17, True), (12, 5, True), (13, 5, False), (0, 18, False),
                                           (17, 0, True), (30, 1, False)])
def test_offset_shard_must_fit(offset, S, ok):
    """An int offset: x is a shard, offset + S <= text_len + T*Hg*Wg (here 5 + 12); None: the exact rule."""
    x = torch.randn(1, S, 2, 32)
    if ok:
        assert rope3d(x, 5, (2, 2, 3), offset=offset).shape == x.shape
    else:
        with pytest.raises(ValueError, match="offset"):
            rope3d(x, 5, (2, 2, 3), offset=offset)


BAD_INPUTS = {
    "x_not_tensor": (TypeError, lambda x, w: rope3d(x.tolist(), 2, (1, 2, 3))),
    "x_int_dtype": (TypeError, lambda x, w: rope3d(x.long(), 2, (1, 2, 3))),
    "x_3d": (ValueError, lambda x, w: rope3d(x[0], 2, (1, 2, 3))),
    "text_len_float": (TypeError, lambda x, w: rope3d(x, 2.0, (1, 2, 3))),
    "text_len_too_long": (ValueError, lambda x, w: rope3d(x, 9, (1, 2, 3))),
    "grid_two_axes": (ValueError, lambda x, w: rope3d(x, 2, (2, 3))),
    "grid_negative": (ValueError, lambda x, w: rope3d(x, 2, (-1, -2, 3))),
    "grid_wrong_count": (ValueError, lambda x, w: rope3d(x, 2, (1, 2, 2))),
    "axes_dim_odd": (ValueError, lambda x, w: rope3d(x, 2, (1, 2, 3), axes_dim=(7, 13, 12))),
    "axes_dim_wrong_sum": (ValueError, lambda x, w: rope3d(x, 2, (1, 2, 3), axes_dim=(8, 8, 8))),
    "weight_wrong_shape": (ValueError, lambda x, w: rope3d(x, 2, (1, 2, 3), weight=w[:-2])),
    "weight_3d": (ValueError, lambda x, w: rope3d(x, 2, (1, 2, 3), weight=w[None, None])),
    "weight_groups_not_dividing_heads": (ValueError, lambda x, w: rope3d(x, 2, (1, 2, 3), weight=w.expand(3, 32))),
    "weight_groups_wrong_dh": (ValueError, lambda x, w: rope3d(x, 2, (1, 2, 3), weight=w.view(2, 16))),
    "weight_bias_shapes_differ": (ValueError, lambda x, w: rope3d(x, 2, (1, 2, 3), weight=w.expand(2, 32), bias=w)),
    "weight_int": (TypeError, lambda x, w: rope3d(x, 2, (1, 2, 3), weight=w.long())),
    "bias_other_device": (ValueError, lambda x, w: rope3d(x, 2, (1, 2, 3), bias=w.to("meta"))),
    "start_two_axes": (ValueError, lambda x, w: rope3d(x, 2, (1, 2, 3), start=(0.0, 0.0))),
    "step_four_axes": (ValueError, lambda x, w: rope3d(x, 2, (1, 2, 3), step=(1.0,) * 4)),
    "start_tensor_fp64": (TypeError, lambda x, w: rope3d(x, 2, (1, 2, 3), start=torch.zeros(3, dtype=torch.float64))),
    "start_tensor_int": (TypeError, lambda x, w: rope3d(x, 2, (1, 2, 3), start=torch.zeros(3, dtype=torch.long))),
    "step_tensor_four": (ValueError, lambda x, w: rope3d(x, 2, (1, 2, 3), step=torch.ones(4))),
    "step_tensor_2d": (ValueError, lambda x, w: rope3d(x, 2, (1, 2, 3), step=torch.ones(1, 3))),
    "start_tensor_other_device": (ValueError, lambda x, w: rope3d(x, 2, (1, 2, 3), start=w[:3].to("meta"))),
    "theta_zero": (ValueError, lambda x, w: rope3d(x, 2, (1, 2, 3), theta=0.0)),
    "offset_negative": (ValueError, lambda x, w: rope3d(x, 2, (1, 2, 3), offset=-1)),
    "offset_float": (TypeError, lambda x, w: rope3d(x, 2, (1, 2, 3), offset=0.0)),
    "offset_bool": (TypeError, lambda x, w: rope3d(x, 2, (1, 2, 3), offset=False)),
    "text_len_negative_in_shard": (ValueError, lambda x, w: rope3d(x, -1, (1, 2, 3), offset=0)),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input(case):
    error, call = BAD_INPUTS[case]
    with pytest.raises(error):
        call(torch.randn(1, 8, 2, 32), torch.randn(32))


def _ref64(x, text_len, grid, weight=None, bias=None, eps=1e-6):
    """LayerNorm and rotation in fp64 (cos/sin of the op's fp32 table): a reference where fp32 statistics are poor."""
    x = x.double()
    Dh = x.shape[-1]
    if weight is not None or bias is not None:
        x = F.layer_norm(x, (Dh,), None if weight is None else weight.double(),
                         None if bias is None else bias.double(), eps)
    cos, sin = (t.double() for t in rope3d_table(grid, axes_dim=R.default_axes_dim(Dh)))
    vis = x[:, text_len:]
    rot = torch.stack([-vis[..., 1::2], vis[..., 0::2]], dim=-1).flatten(-2)
    return torch.cat([x[:, :text_len], vis * cos[None, :, None] + rot * sin[None, :, None]], dim=1)


def _constant_x(B, S, H, Dh):
    """Every (token, head) row one value: 12345.678, 98765.4 and a few others, cycled."""
    consts = torch.tensor([12345.678, 98765.4, -3.25, 0.0, 7.0e4, 1.0])
    return consts[torch.arange(B * S * H) % consts.numel()].view(B, S, H, 1).expand(B, S, H, Dh).contiguous()


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_constant_rows(monkeypatch, kernels):
    """Issue 12: a row of equal values normalizes to exactly 0 (F.layer_norm's result; the Triton path gave 0.70 and
    0.99): the output is the rotated bias, zero without one; the backward is finite and matches fp64 autograd."""
    monkeypatch.setenv("COGVIDEOX_KERNELS", kernels)
    text_len, grid = 3, (1, 2, 3)
    x = _constant_x(2, 9, 3, 64)
    w, b = 1 + 0.3 * torch.randn(64), 0.3 * torch.randn(64)
    out = rope3d(x, text_len, grid, weight=w)
    assert torch.equal(out, torch.zeros_like(out))
    dy = torch.randn(2, 9, 3, 64)
    out, grads = _run(rope3d, x, dy, w, b, (text_len, grid), {})
    ref, ref_grads = _run(lambda x, **k: _ref64(x, text_len, grid, **k), x, dy.double(), w, b, (), {})
    assert_parity(out, ref, name="out")
    for name, g, r in zip(("dx", "dweight", "dbias"), grads, ref_grads):
        assert torch.isfinite(g).all(), name
        assert_parity(g, r, name=name)


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_near_constant_rows(monkeypatch, kernels):
    """Rows 12345.678 + 1e-3 randn: forward and gradients err at most 2x torch's fp32 (rope3d_ref) vs fp64."""
    monkeypatch.setenv("COGVIDEOX_KERNELS", kernels)
    text_len, grid = 3, (1, 2, 3)
    x = (12345.678 + 1e-3 * torch.randn(2, 9, 3, 64, dtype=torch.float64)).float()
    w, b, dy = 1 + 0.3 * torch.randn(64), 0.3 * torch.randn(64), torch.randn(2, 9, 3, 64)
    out, grads = _run(rope3d, x, dy, w, b, (text_len, grid), {})
    ref, ref_grads = _run(lambda x, **k: _ref64(x, text_len, grid, **k), x, dy.double(), w, b, (), {})
    pl, pl_grads = _run(rope3d_ref, x, dy, w, b, (text_len, grid), {})
    for name, a, r, p in zip(("out", "dx", "dweight", "dbias"), [out, *grads], [ref, *ref_grads], [pl, *pl_grads]):
        err, plain_err = (a.double() - r).abs().max().item(), (p.double() - r).abs().max().item()
        assert err <= 2 * plain_err + 1e-5 * r.abs().max().item(), f"{name}: {err:.3e} vs torch fp32 {plain_err:.3e}"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN * 0 not selected
@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_non_finite_text_tokens_pass_through(monkeypatch, kernels):
    """NaN / inf in channel 2k+1 of a text token stays there: text tokens are copied, not multiplied by sin = 0
    (the Triton path turned channel 2k into NaN); forward and backward, vision tokens untouched by it."""
    monkeypatch.setenv("COGVIDEOX_KERNELS", kernels)
    text_len, grid = 4, (1, 2, 3)
    x, dy = torch.randn(2, 10, 3, 64), torch.randn(2, 10, 3, 64)
    clean = rope3d(x, text_len, grid)
    for t in (x, dy):
        t[:, 1, :, 5], t[:, 2, 0, 17], t[:, 3, 2, 63] = float("nan"), float("inf"), -float("inf")
    out, (dx, _, _) = _run(rope3d, x, dy, None, None, (text_len, grid), {})
    for got, want in ((out, x), (dx, dy)):
        assert torch.equal(got[:, :text_len].nan_to_num(), want[:, :text_len].nan_to_num())
        assert torch.equal(got[:, :text_len].isnan(), want[:, :text_len].isnan())
    assert torch.equal(out[:, text_len:], clean[:, text_len:])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN * 0 not selected
def test_theta_inf_in_the_kernel_matches_reference(triton_kernels):
    """rope3d refuses theta = inf; the custom op handed it still matches the reference (inv_freq 1 for k = 0, else
    0), where the kernel used to give NaN on every vision token (-0 * inf in its exp2)."""
    x = torch.randn(1, 2 + 6, 2, 32)
    pos = torch.tensor([0.0, 0.5, 1.0]), torch.tensor([1.0, 2.0, 0.75])
    out = torch.ops.cogvideox.rope3d(x, 2, [1, 2, 3], *pos, float("inf"), [8, 12, 12], None, None, 1e-6)
    ref = rope3d_ref(x, 2, (1, 2, 3), *pos, theta=float("inf"), axes_dim=(8, 12, 12))
    assert torch.isfinite(ref).all()
    assert_parity(out, ref)


@pytest.mark.parametrize("theta, error, msg", [
    (float("inf"), ValueError, "theta must be a finite number > 0, got inf"),
    (float("nan"), ValueError, "theta must be a finite number > 0, got nan"),
    (-1.0, ValueError, "theta must be a finite number > 0, got -1.0"),
    ("1e4", TypeError, "theta must be a real number, got str"),
])
def test_bad_theta(theta, error, msg):
    with pytest.raises(error) as info:
        rope3d(torch.randn(1, 8, 2, 32), 2, (1, 2, 3), theta=theta)
    assert msg in str(info.value)


@pytest.mark.parametrize("kw, error, msg", [
    (dict(start=("a", "b", "c")), TypeError, "start[t] must be a real number, got str"),
    (dict(step=(1.0, None, 1.0)), TypeError, "step[h] must be a real number, got NoneType"),
    (dict(start=(0.0, 0.0, float("nan"))), ValueError, "start[w] must be finite, got nan"),
    (dict(step=(float("inf"), 1.0, 1.0)), ValueError, "step[t] must be finite, got inf"),
    (dict(start=5.0), TypeError, "start must be three floats (t, h, w) or an fp32 (3,) tensor, got float"),
    (dict(start=(0.0, 0.0)), ValueError, "start must hold three floats"),
])
def test_bad_positions_name_the_argument(kw, error, msg):
    with pytest.raises(error) as info:
        rope3d(torch.randn(1, 8, 2, 32), 2, (1, 2, 3), **kw)
    assert msg in str(info.value)


@pytest.mark.parametrize("grid", [(0, 2, 3), (2, 0, 3), (1, 3, 0)])
@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_no_vision_tokens(monkeypatch, kernels, grid):
    """T, Hg or Wg = 0: every token is text (the LayerNorm alone), on both paths (the reference crashed reshaping
    an empty table), forward and backward, whole sequence and shard."""
    monkeypatch.setenv("COGVIDEOX_KERNELS", kernels)
    x, dy = torch.randn(2, 5, 3, 32), torch.randn(2, 5, 3, 32)
    w, b = 1 + 0.3 * torch.randn(32), 0.3 * torch.randn(32)
    for kw in ({}, {"offset": 0}):
        out, grads = _run(rope3d, x, dy, w, b, (5, grid), kw)
        ref, ref_grads = _run(lambda x, **k: F.layer_norm(x, (32,), k["weight"], k["bias"], 1e-6), x.double(),
                              dy.double(), w.double(), b.double(), (), {})
        assert_parity(out, ref)
        for g, r in zip(grads, ref_grads):
            assert_parity(g, r)
    assert torch.equal(rope3d(x, 5, grid), x)


def test_documented_module_attributes():
    """README: kernels.rope3d.rope3d_positions / rope3d_config work although kernels.rope3d is the (callable) op."""
    import kernels
    assert callable(kernels.rope3d)
    assert kernels.rope3d.rope3d_positions is R.rope3d_positions and kernels.rope3d.rope3d_config is R.rope3d_config
    start, step = kernels.rope3d.rope3d_positions((0.0, 1.0, 2.0), (1.0, 1.0, 0.5), "cpu")
    assert start.tolist() == [0.0, 1.0, 2.0] and step.dtype == torch.float32
    assert kernels.rope3d.rope3d_config(48, 64)["BLOCK_D"] == 64


@pytest.mark.parametrize("eps, error, msg", [
    (0.0, ValueError, "eps must be a finite number > 0, got 0.0"),
    (-1e-6, ValueError, "eps must be a finite number > 0, got -1e-06"),
    (float("nan"), ValueError, "eps must be a finite number > 0, got nan"),
    (float("inf"), ValueError, "eps must be a finite number > 0, got inf"),
    (None, TypeError, "eps must be a real number, got NoneType"),
    ("1e-6", TypeError, "eps must be a real number, got str"),
])
def test_bad_eps(eps, error, msg):
    """The shared check (kernels._dispatch.check_eps): a bad eps used to reach the kernels and yield NaN."""
    x, w = torch.randn(1, 8, 2, 32), torch.randn(32)
    with pytest.raises(error) as info:
        rope3d(x, 2, (1, 2, 3), weight=w, eps=eps)
    assert msg in str(info.value)


def test_empty_batch(triton_kernels):
    x = torch.randn(0, 2 + 6, 2, 32, requires_grad=True)
    out = rope3d(x, 2, (1, 2, 3))
    out.sum().backward()
    assert out.shape == x.shape and x.grad.shape == x.shape


def test_offsets_beyond_2_31_elements(tmp_path):
    """A token stride of 2^29 + 128 puts the last token's offset past 2^31 elements. The interpreter wraps int32
    index math like the GPU, so 32-bit offsets would read the wrong address (in practice: crash). Runs in a child
    process so that such a crash fails this test instead of the whole session; 4 GiB is reserved, not touched."""
    script = textwrap.dedent("""
        import os, torch, importlib
        R = importlib.import_module("kernels.rope3d")
        H, Dh, S, stride = 2, 64, 5, 2**29 + 128
        base = torch.empty(stride * (S - 1) + H * Dh, dtype=torch.bfloat16)
        x = base.as_strided((1, S, H, Dh), (0, stride, Dh, 1))
        vals = torch.randn(1, S, H, Dh).bfloat16()
        x.copy_(vals)
        w, b = torch.randn(Dh), torch.randn(Dh)
        out = R.rope3d(x, 1, (1, 2, 2), weight=w, bias=b)
        assert torch.equal(out, R.rope3d_ref(vals, 1, (1, 2, 2), weight=w, bias=b)), "forward"
        dy = torch.randn(1, S, H, Dh).bfloat16()
        pos = torch.zeros(3), torch.ones(3)
        dx, dw, db = torch.ops.cogvideox.rope3d_bwd(dy, x, 1, [1, 2, 2], *pos, 1e4, [16, 24, 24], w, b, 1e-6)
        ref = R._rope3d_bwd_ref(dy, vals, 1, [1, 2, 2], *pos, 1e4, [16, 24, 24], w, b, 1e-6)
        assert (dx.float() - ref[0].float()).abs().max() < 0.1, "backward"
        print("ok")
    """)
    env = dict(os.environ, COGVIDEOX_KERNELS="triton", TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])


# ---- packed sequences (kernels.Segments) ------------------------------------------------------------------------

# Five segments: text + video with fractional positions, one without text, a text-only one (a zero in its grid), an
# empty one, a one-frame video. Lengths 17, 6, 3, 0, 3: the grid covers the longest, so the shorter segments have
# idle blocks.
SEGMENTS = dict(text_lens=[5, 0, 3, 0, 2], grids=[(2, 2, 3), (1, 3, 2), (0, 2, 3), (0, 0, 0), (1, 1, 1)],
                start=[(0.0, 1.0, 0.5), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), (2.0, 3.0, 0.25)],
                step=[(1.0, 0.75, 1.25), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), (1.0, 0.5, 4.2)])


def _segments():
    from kernels import Segments
    return Segments(**SEGMENTS)


def _alone(fn, x, dy, w, b, seg, **kw):
    """fn run on each segment alone: (the outputs concatenated, dx concatenated, dweight / dbias summed)."""
    outs, dxs, dws, dbs = [], [], [], []
    for (lo, hi), L, g, s0, s1 in zip(seg.ranges(), seg.text_lens, seg.grids, seg.start, seg.step):
        out, (dx, dw, db) = _run(fn, x[:, lo:hi], dy[:, lo:hi], w, b, (L, g, s0, s1), kw)
        outs.append(out), dxs.append(dx), dws.append(dw), dbs.append(db)
    total = [None if d[0] is None else torch.stack([t.float() for t in d]).sum(0) for d in (dws, dbs)]
    return torch.cat(outs, dim=1), torch.cat(dxs, dim=1), *total


@pytest.mark.parametrize("norm", [True, False], ids=["norm", "nonorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_packed_equals_each_segment_alone(triton_kernels, monkeypatch, dtype, norm):
    """rope3d(packed x, segments=) is each segment run alone (the dense kernel), forward and dx bit for bit (every
    token sees the same arithmetic), dweight / dbias summed over the segments within 1e-5 (fp32 sums in another
    order); against the fp32 reference by the house rule. Every buffer the launchers allocate starts as NaN: idle
    blocks of short segments still write their (zero) partial rows."""
    seg = _segments()
    x = _x(1, seg.total, 3, 64, dtype, "qkv")
    w = (1 + 0.3 * torch.randn(64)).to(dtype) if norm else None
    b = (0.3 * torch.randn(64)).to(dtype) if norm else None
    dy = torch.randn(1, seg.total, 3, 64).to(dtype)
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    out, (dx, dw, db) = _run(rope3d, x, dy, w, b, (None, None), dict(segments=seg))
    alone = _alone(rope3d, x, dy, w, b, seg)
    assert out.dtype == dtype and out.is_contiguous() and dx.dtype == dtype
    assert torch.equal(out, alone[0]) and torch.equal(dx, alone[1])
    f32 = [None if t is None else t.float() for t in (x, w, b)]
    ref, ref_grads = _run(rope3d_ref, f32[0], dy.float(), *f32[1:], (None, None), dict(segments=seg))
    plain = _alone(lambda x, L, g, s0, s1, weight=None, bias=None: _plain(x, L, g, s0, s1, 10000.0, None, weight,
                                                                          bias, 1e-6), x, dy, w, b, seg)
    if dtype == torch.float32:
        plain = [None] * 4
    for name, g, r, p, a in zip(("out", "dx", "dweight", "dbias"), (out, dx, dw, db), (ref, *ref_grads), plain,
                                alone):
        if r is None:
            assert g is None
            continue
        assert_parity(g, r, p, name=name)
        if name in ("dweight", "dbias"):
            assert g.dtype == dtype
            assert_parity(g.float(), a, name=name + " vs alone", rtol=1e-5 if dtype == torch.float32 else 1e-2)


def test_packed_compile_fullgraph(triton_kernels):
    """torch.compile(fullgraph=True) of a packed call: no graph break, one graph, forward and gradients equal to
    eager."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    seg = _segments()

    def f(x, weight=None, bias=None):
        return rope3d(x, None, None, weight=weight, bias=bias, segments=seg) * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x, dy = _x(1, seg.total, 2, 64, torch.float32, "qkv"), torch.randn(1, seg.total, 2, 64)
    w, b = torch.randn(64), torch.randn(64)
    out, grads = _run(compiled, x, dy, w, b, (), {})
    ref, ref_grads = _run(f, x, dy, w, b, (), {})
    assert torch.equal(out, ref)
    for g, r in zip(grads, ref_grads):
        assert torch.equal(g, r)
    assert sum(counters["graph_break"].values()) == 0 and counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("norm", [True, False], ids=["norm", "nonorm"])
def test_packed_reference_path(monkeypatch, norm):
    """The op's CPU path with segments (the layout rebuilt from its tensors): forward bit for bit rope3d_ref,
    backward (pure torch) equal to autograd through rope3d_ref."""
    monkeypatch.setenv("COGVIDEOX_KERNELS", "torch")
    seg = _segments()
    x, dy = _x(1, seg.total, 2, 32, torch.float32, "qkv"), torch.randn(1, seg.total, 2, 32)
    w, b = (torch.randn(32), torch.randn(32)) if norm else (None, None)
    kw = dict(axes_dim=(8, 12, 12), segments=seg)
    out, grads = _run(rope3d, x, dy, w, b, (None, None), kw)
    ref, ref_grads = _run(rope3d_ref, x, dy, w, b, (None, None), kw)
    assert torch.equal(out, ref)
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None)
        if g is not None:
            assert_parity(g, r)


def test_packed_backward_deterministic(triton_kernels):
    seg = _segments()
    x = _x(1, seg.total, 3, 64, torch.bfloat16, "qkv")
    w, b = torch.randn(64).bfloat16(), torch.randn(64).bfloat16()
    dy = torch.randn(1, seg.total, 3, 64).bfloat16()
    first = _run(rope3d, x, dy, w, b, (None, None), dict(segments=seg))[1]
    second = _run(rope3d, x, dy, w, b, (None, None), dict(segments=seg))[1]
    for g1, g2 in zip(first, second):
        assert torch.equal(g1.view(torch.int16), g2.view(torch.int16))


PACKED_ERRORS = {
    "text_len_given": (ValueError, "text_len and grid must be None", lambda x, s: rope3d(x, 5, None, segments=s)),
    "grid_given": (ValueError, "text_len and grid must be None", lambda x, s: rope3d(x, None, (2, 2, 3), segments=s)),
    "start_given": (ValueError, "start must be left at its default",
                    lambda x, s: rope3d(x, None, None, start=(0.0, 1.0, 0.0), segments=s)),
    "start_tensor": (ValueError, "start must be left at its default",
                     lambda x, s: rope3d(x, None, None, start=torch.zeros(3), segments=s)),
    "step_given": (ValueError, "step must be left at its default",
                   lambda x, s: rope3d(x, None, None, step=(1.0, 2.0, 1.0), segments=s)),
    "offset_given": (ValueError, "offset must be None", lambda x, s: rope3d(x, None, None, offset=0, segments=s)),
    "x_too_short": (ValueError, "packed", lambda x, s: rope3d(x[:, 1:], None, None, segments=s)),
    "x_batch_2": (ValueError, "packed", lambda x, s: rope3d(x.expand(2, -1, -1, -1), None, None, segments=s)),
    "segments_not_segments": (TypeError, "kernels.Segments", lambda x, s: rope3d(x, None, None, segments=[5, 12])),
    "segments_other_device": (ValueError, "segments' tensors are on meta",
                              lambda x, s: rope3d(x, None, None, segments=s.to("meta"))),
    "weight_groups": (ValueError, "G dividing the 2 heads",
                      lambda x, s: rope3d(x, None, None, weight=torch.randn(3, 32), segments=s)),
}


@pytest.mark.parametrize("case", PACKED_ERRORS)
def test_packed_bad_input(case):
    error, msg, call = PACKED_ERRORS[case]
    seg = _segments()
    with pytest.raises(error, match=re.escape(msg)):
        call(torch.randn(1, seg.total, 2, 32), seg)


# ---- q and k in one launch: (G, Dh) weights ------------------------------------------------------------------------

def _qk(B, S, H, Dh, dtype):
    """The fused QKV output (B, S, 3 H Dh) and its q+k view (B, S, 2H, Dh): no copy, heads [q_0..q_H-1, k_0..]."""
    qkv = torch.randn(B, S, 3 * H * Dh).to(dtype)
    qk = qkv.unflatten(-1, (3, H, Dh))[:, :, :2].flatten(2, 3)
    assert qk.data_ptr() == qkv.data_ptr() and qk.shape == (B, S, 2 * H, Dh) and not qk.is_contiguous()
    return qkv, qk


@pytest.mark.parametrize("rope", [True, False], ids=["5b_rope", "2b_no_rope"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grouped_weights_equal_two_calls(triton_kernels, dtype, rope):
    """q and k through one launch on the strided view of the QKV output, weight / bias torch.stack([norm_q, norm_k])
    (G = 2): out[:, :, :H] is rope3d(q, norm_q), out[:, :, H:] rope3d(k, norm_k), bit for bit; the gradient reaches
    qkv (q and k parts as the two calls give, v none) and, through torch.stack, the two LayerNorm weights and
    biases (1e-5 / the house rule for bf16 against the fp32 reference)."""
    B, H, Dh, text_len, grid = 2, 3, 64, 4, (2, 2, 2)
    if not rope:                                   # the 2B: no RoPE, the LayerNorm alone (every token "text")
        text_len, grid = 12, (0, 0, 0)
    S = text_len + grid[0] * grid[1] * grid[2]
    kw = dict(start=(0.0, 0.5, 0.0), step=(1.0, 1.0, 0.75))
    qkv, _ = _qk(B, S, H, Dh, dtype)
    params = [((1 + 0.3 * torch.randn(Dh)).to(dtype), (0.3 * torch.randn(Dh)).to(dtype)) for _ in "qk"]
    dy = torch.randn(B, S, 2 * H, Dh).to(dtype)

    def fused(fn, qkv, wq, bq, wk, bk):
        qk = qkv.unflatten(-1, (3, H, Dh))[:, :, :2].flatten(2, 3)
        return fn(qk, text_len, grid, weight=torch.stack([wq, wk]), bias=torch.stack([bq, bk]), **kw)

    def separate(fn, qkv, wq, bq, wk, bk):
        q, k = qkv.unflatten(-1, (3, H, Dh))[:, :, 0], qkv.unflatten(-1, (3, H, Dh))[:, :, 1]
        return torch.cat([fn(q, text_len, grid, weight=wq, bias=bq, **kw),
                          fn(k, text_len, grid, weight=wk, bias=bk, **kw)], dim=2)

    def run(combine, fn, cast):
        leaves = [cast(t).detach().requires_grad_() for t in (qkv, *params[0], *params[1])]
        out = combine(fn, *leaves)
        return out.detach(), torch.autograd.grad(out, leaves, cast(dy))

    out, grads = run(fused, rope3d, lambda t: t)
    two, two_grads = run(separate, rope3d, lambda t: t)
    ref, ref_grads = run(fused, rope3d_ref, lambda t: t.float())
    assert torch.equal(out, two) and torch.equal(grads[0], two_grads[0])
    assert torch.equal(grads[0].unflatten(-1, (3, -1))[:, :, 2], torch.zeros(B, S, H * Dh, dtype=dtype))
    sep_ref = run(separate, rope3d_ref, lambda t: t.float())
    assert_parity(ref, sep_ref[0], name="reference: fused vs separate")
    plain, plain_grads = None, [None] * 5
    if dtype != torch.float32:                     # diffusers' two nn.LayerNorm + apply_rotary_emb in bf16
        def plain_fn(x, L, g, weight, bias, start, step):
            return _plain(x, L, g, start, step, 10000.0, None, weight, bias, 1e-6)
        plain, plain_grads = run(separate, plain_fn, lambda t: t)
    assert_parity(out, ref, plain, name="out")
    for name, g, t, r, p in zip(("dqkv", "dw_q", "db_q", "dw_k", "db_k"), grads, two_grads, ref_grads,
                                plain_grads):
        assert g.dtype == dtype
        assert_parity(g, r, p, name=name)
        if name != "dqkv":
            assert_parity(g.float(), t.float(), name=name + " vs two calls",
                          rtol=1e-5 if dtype == torch.float32 else 1e-2)


def test_grouped_weights_packed(triton_kernels):
    """Both features at once: the q+k view of a packed QKV output with segments and (2, Dh) weights."""
    seg, H, Dh = _segments(), 2, 64
    qkv, qk = _qk(1, seg.total, H, Dh, torch.float32)
    w, b = 1 + 0.3 * torch.randn(2, Dh), 0.3 * torch.randn(2, Dh)
    dy = torch.randn(1, seg.total, 2 * H, Dh)
    out, grads = _run(rope3d, qk, dy, w, b, (None, None), dict(segments=seg))
    ref, ref_grads = _run(rope3d_ref, qk, dy, w, b, (None, None), dict(segments=seg))
    assert grads[1].shape == (2, Dh) and grads[2].shape == (2, Dh)
    assert_parity(out, ref)
    for g, r in zip(grads, ref_grads):
        assert_parity(g, r)
    q_alone = _alone(rope3d, qk[:, :, :H], dy[:, :, :H], w[0], b[0], seg)
    assert torch.equal(out[:, :, :H], q_alone[0]) and torch.equal(grads[0][:, :, :H], q_alone[1])
    assert_parity(grads[1][0], q_alone[2]) and assert_parity(grads[2][0], q_alone[3])


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_opcheck_packed_and_grouped(monkeypatch, kernels):
    monkeypatch.setenv("COGVIDEOX_KERNELS", kernels)
    seg = _segments()
    x = _x(1, seg.total, 2, 32, torch.float32, "qkv").requires_grad_()
    w, b = torch.randn(32, requires_grad=True), torch.randn(32, requires_grad=True)
    layout = (seg.cu_seqlens, seg.text_lens_t, seg.grids_t, seg.max_len)
    packed = (0, [0, 0, 0], seg.start_t, seg.step_t, 10000.0, [8, 12, 12])
    op, bwd = torch.ops.cogvideox.rope3d.default, torch.ops.cogvideox.rope3d_bwd.default
    torch.library.opcheck(op, (x, *packed, w, b, 1e-6, 0, *layout))
    torch.library.opcheck(op, (x, *packed, None, None, 1e-6, 0, *layout))
    dy = torch.randn(1, seg.total, 2, 32)
    torch.library.opcheck(bwd, (dy, x.detach(), *packed, w.detach(), b.detach(), 1e-6, 0, *layout))
    torch.library.opcheck(bwd, (dy, None, *packed, None, None, 1e-6, 0, *layout))
    # (G, Dh) = (2, 32) weights over 4 heads, dense
    xg = _x(1, 2 + 6, 4, 32, torch.float32, "qkv").requires_grad_()
    wg, bg = torch.randn(2, 32, requires_grad=True), torch.randn(2, 32, requires_grad=True)
    dense = (2, [1, 2, 3], torch.tensor([0.0, 0.5, 0.0]), torch.tensor([1.0, 1.0, 0.75]), 10000.0, [8, 12, 12])
    torch.library.opcheck(op, (xg, *dense, wg, bg, 1e-6))
    torch.library.opcheck(bwd, (torch.randn(1, 8, 4, 32), xg.detach(), *dense, wg.detach(), None, 1e-6))


def _aot_build(backward, H, dtype, norm, groups=1, varlen=0):
    """compile_sm90 of one kernel variant at the block sizes and warps the launcher picks (Dh = 64). H: the heads
    of one weight row (the launcher's H // G)."""
    kernel = R._rope3d_bwd_kernel if backward else R._rope3d_fwd_kernel
    cfg = R.rope3d_config(H, 64, backward=backward)
    ptrs = ("DY", "X", "W", "DX") if backward else ("X", "W", "Bias", "OUT")
    sig = {n: "constexpr" for n in kernel.arg_names}
    sig.update({n: "*" + dtype for n in ptrs})
    sig.update({n: "*fp32" for n in ("DW_PART", "DB_PART") if backward})
    sig.update({"START": "*fp32", "STEP": "*fp32"})
    sig.update({n: "*i32" if varlen else "*fp32" for n in ("CU", "TEXT", "GRIDS")})   # dense: a dummy, unread
    sig.update({n: "i32" for n in ("B", "S", "H", "sxb", "sxs", "sxh", "text_len", "offset", "Hg", "Wg")})
    sig.update({n: "fp32" for n in ("log2_theta", "eps")})
    const = dict(HEAD_DIM=64, DT=16, DH=24, NORM=norm, HAS_W=norm, HAS_B=norm, GROUPS=groups, VARLEN=varlen,
                 BLOCK_S=cfg["BLOCK_S"], BLOCK_H=cfg["BLOCK_H"], BLOCK_D=cfg["BLOCK_D"])
    # what the JIT specializes at CogVideoX shapes: 16-byte aligned buffers, strides that are multiples of 16
    # (not STEP: the model passes the rows of one (2, 3) positions tensor, STEP 12 bytes in)
    divisible = tuple(n for n in sig if sig[n].startswith("*") and n != "STEP") + ("sxb", "sxs", "sxh")
    info = compile_sm90(kernel, sig, const, num_warps=cfg["num_warps"], divisible_by_16=divisible)
    return {"n_regs": info.n_regs, "spills": info.spills, "local_depot": "__local_depot" in info.ptx,
            "offset_mul_types": re.findall(r"%(?:x_off|out_off|row_off)\w* = arith\.muli [^:]*: (\S+)", info.ttir)}


# dtype, norm, GROUPS, VARLEN: the dense q or k call, q and k in one call (G = 2), a packed sequence
AOT_VARIANTS = [("bf16", 1, 1, 0), ("bf16", 0, 1, 0), ("fp32", 1, 1, 0), ("bf16", 1, 2, 0), ("bf16", 1, 1, 1)]


@pytest.fixture(scope="module")
def aot_builds():
    pytest.importorskip("triton.backends.nvidia", reason="triton's NVIDIA backend is needed for the AOT build")
    return {f"{b}-{H}-{v}": _aot_build(b, H, *v) for b in (0, 1) for H in (30, 48) for v in AOT_VARIANTS}


@pytest.mark.parametrize("H", [30, 48], ids=["2b", "5b"])
@pytest.mark.parametrize("backward", [0, 1], ids=["fwd", "bwd"])
def test_aot_sm90_no_spills_and_64bit_offsets(aot_builds, H, backward):
    for v in AOT_VARIANTS:
        info = aot_builds[f"{backward}-{H}-{v}"]
        assert not info["spills"], f"{v}: {info}"
        assert info["n_regs"] <= 128, f"{v}: {info}: occupancy too low for a memory-bound kernel"
        # indices are widened before they meet a stride: every multiply building an x / out / dy / dx offset is i64
        types = info["offset_mul_types"]
        assert types and all(t in ("i64",) or t.endswith("xi64>") for t in types), types
        assert not info["local_depot"], "sin/cos must not pull in libdevice's local-memory slow path"
