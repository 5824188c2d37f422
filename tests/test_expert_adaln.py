"""expert_adaln / expert_adaln_residual: Triton kernels (interpreter) against an fp64 reference, every gradient.

Inputs are laid out as the model produces them: x, y slices of bigger tensors, shift/scale/gate strided views of
one (B, 6D) modulation output. CogVideoX shapes scaled down: S small, D = 72 (not a power of two) and D = 1920.
"""
import importlib
import re

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F

from kernels import Segments
from kernels._aot import compile_sm90
from kernels._dispatch import check_grid
from kernels.expert_adaln import (expert_adaln, expert_adaln_ref, expert_adaln_residual, expert_adaln_residual_ref,
                                  expert_rows)
from kernels.segments import segment_rows
from tests.conftest import assert_parity, max_err, poison_like

ea = importlib.import_module("kernels.expert_adaln")  # the module: kernels/__init__ shadows it with the function

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = 1e-5


def make_inputs(B, S, D, E, dtype, affine=True, weight_dtype=None, seed=0):
    """x, y: non-contiguous slices of one bigger tensor; mod: the (B, 6D) modulation output that views() cuts
    gate/shift/scale from; weight, bias: (D,) or None. Values drawn in fp64, rounded once to dtype."""
    g = torch.Generator().manual_seed(seed)
    wd = weight_dtype or dtype
    big = torch.randn(B, S + 3, 2 * D + 5, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    mod = (0.5 * torch.randn(B, 6 * D, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    weight = (1 + 0.3 * torch.randn(D, generator=g, dtype=torch.float64)).to(wd).requires_grad_() if affine else None
    bias = (0.3 * torch.randn(D, generator=g, dtype=torch.float64)).to(wd).requires_grad_() if affine else None
    x = big[:, 1:S + 1, 2:D + 2]                              # (B, S, D), strides ((S+3)(2D+5), 2D+5, 1)
    y = big[:, 2:S + 2, D + 4:2 * D + 4]
    assert S == 0 or not (x.is_contiguous() or y.is_contiguous())
    return {"x": x, "y": y, "mod": mod, "weight": weight, "bias": bias}


def views(leaves, E):
    """The op's arguments: gate, shift, scale are strided views of mod, as the model's chunk() gives them."""
    x, y, mod = leaves["x"], leaves["y"], leaves["mod"]
    D = x.shape[-1]
    six = mod.view(mod.shape[0], 6, D)
    # E = 2: expert e takes chunk 3e + k, text first (strides (6D, 3D, 1)); E = 1: chunk k alone.
    pick = (lambda k: six[:, k::3]) if E == 2 else (lambda k: six[:, k:k + 1])
    return x, y, pick(2), pick(0), pick(1), leaves["weight"], leaves["bias"]


def plain(x, y, gate, shift, scale, text_len, weight, bias, residual):
    """Op by op in the inputs' dtype, the way diffusers computes it (fp64 inputs give the reference)."""
    S, D = x.shape[1], x.shape[2]
    if residual:
        x = x + expert_rows(gate, text_len, S) * y
    out = F.layer_norm(x, (D,), weight, bias, EPS) * (1 + expert_rows(scale, text_len, S))
    out = out + expert_rows(shift, text_len, S)
    return (x, out) if residual else (out,)


def ours(x, y, gate, shift, scale, text_len, weight, bias, residual):
    if residual:
        return expert_adaln_residual(x, y, gate, shift, scale, text_len, weight, bias, EPS)
    return (expert_adaln(x, shift, scale, text_len, weight, bias, EPS),)


def run(fn, leaves, E, text_len, residual, grads_out):
    """Outputs and gradients w.r.t. every leaf that takes part (y only with the residual)."""
    args = views(leaves, E)
    outs = fn(*args[:5], text_len, *args[5:], residual)
    names = [k for k in ("x", "y", "mod", "weight", "bias") if leaves[k] is not None and (residual or k != "y")]
    grads = torch.autograd.grad(outs, [leaves[k] for k in names], grads_out)
    return outs, dict(zip(names, grads))


def to64(leaves):
    return {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in leaves.items()}


def check_case(B, S, D, E, text_len, dtype, residual, affine=True, weight_dtype=None, stride0=False):
    leaves = make_inputs(B, S, D, E, dtype, affine, weight_dtype)
    g = torch.Generator().manual_seed(1)
    n_out = 2 if residual else 1
    if stride0:   # what .sum().backward() hands the op: expanded scalars
        grads_out = [torch.ones((), dtype=dtype).expand(B, S, D) for _ in range(n_out)]
    else:
        grads_out = [torch.randn(B, S, D, generator=g).to(dtype) for _ in range(n_out)]
    o_ours, g_ours = run(ours, leaves, E, text_len, residual, grads_out)
    o_ref, g_ref = run(plain, to64(leaves), E, text_len, residual, [t.double() for t in grads_out])
    o_pl, g_pl = run(plain, leaves, E, text_len, residual, grads_out)
    for name, a, r, p in zip(["x_new", "out"][-n_out:], o_ours, o_ref, o_pl):
        assert_parity(a, r, p, atol=_atol(r, a.dtype), name=name)
    for k in g_ref:
        if g_ours[k].dtype == torch.float32 and dtype != torch.float32:
            # fp32 parameter, half activations: the activations' rounding bounds the error, so the half rule applies.
            err, plain_err = max_err(g_ours[k], g_ref[k]), max_err(g_pl[k], g_ref[k])
            assert err <= 2 * plain_err + _atol(g_ref[k], dtype), f"d{k}: {err:.3e} vs plain {plain_err:.3e}"
        else:
            assert_parity(g_ours[k], g_ref[k], g_pl[k], atol=_atol(g_ref[k], g_ours[k].dtype), name=f"d{k}")


def _atol(ref, dtype):
    """fp32: 1e-6 absolute (rtol does the rest); half types: a quarter ulp of the largest reference value."""
    if dtype == torch.float32:
        return 1e-6
    return 0.25 * torch.finfo(dtype).eps * ref.abs().max().item()


CASES = [  # (B, S, D, E, text_len, affine)
    (2, 11, 72, 2, 0, True),
    (2, 11, 72, 2, 1, False),
    (2, 11, 72, 2, 7, True),       # text_len > S/2: a program's rows straddle the text/vision boundary
    (1, 9, 72, 1, 4, True),        # one expert for every token
    (2, 5, 1920, 2, 3, True),      # CogVideoX-2B width
]


@pytest.mark.parametrize("residual", [False, True], ids=["adaln", "residual"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}S{}D{}E{}t{}{}".format(*c[:5], "" if c[5] else "-noaffine"))
def test_parity_triton(triton_kernels, case, dtype, residual):
    B, S, D, E, text_len, affine = case
    check_case(B, S, D, E, text_len, dtype, residual, affine)


@pytest.mark.parametrize("n_sm", [1, 4, 64])
def test_program_layouts(triton_kernels, monkeypatch, n_sm):
    """The same results whatever the rows-per-program split: one SM gives multi-row programs (forward 6 rows, one
    program straddling text_len = 7; backward the whole sample, through the pipeline), four give several backward
    programs per sample (partials summed over programs), 64 gives one row per program everywhere."""
    monkeypatch.setattr(ea, "num_sms", lambda device: n_sm)
    cfg = ea.launch_config(2, 11, 72, n_sm)
    assert {1: (6, 11), 4: (2, 3), 64: (1, 1)}[n_sm] == (cfg["fwd_rows"], cfg["bwd_rows"])
    check_case(2, 11, 72, 2, 7, torch.float32, True)


@pytest.mark.parametrize("residual", [False, True], ids=["adaln", "residual"])
def test_stride0_grads_and_fp32_weight(triton_kernels, residual):
    """Stride-0 incoming gradients, bf16 activations with fp32 LayerNorm parameters."""
    check_case(2, 9, 72, 2, 5, torch.bfloat16, residual, weight_dtype=torch.float32, stride0=True)


def test_only_one_output_used(triton_kernels):
    """Gradient flows from out alone and from x_new alone (the other output's gradient is zero)."""
    leaves = make_inputs(2, 8, 72, 2, torch.float32)
    ref = to64(leaves)
    for pick in (0, 1):
        a = expert_adaln_residual(*views(leaves, 2)[:5], 3, *views(leaves, 2)[5:], EPS)[pick]
        r = plain(*views(ref, 2)[:5], 3, *views(ref, 2)[5:], True)[pick]
        ga = torch.autograd.grad(a.square().sum(), [leaves["x"], leaves["mod"]], allow_unused=True)
        gr = torch.autograd.grad(r.square().sum(), [ref["x"], ref["mod"]], allow_unused=True)
        for u, v in zip(ga, gr):
            assert_parity(u, v, atol=1e-5)


def test_every_element_written(triton_kernels, monkeypatch):
    """Outputs, gradients and the partial-sum buffer start as NaN: any element a kernel skips would show."""
    monkeypatch.setattr(ea, "_alloc", lambda *a, **k: poison_like(torch.empty(*a, **k)))
    check_case(2, 11, 72, 2, 7, torch.float32, True)
    check_case(2, 7, 72, 2, 0, torch.float32, False, affine=False)


def test_empty_sequence(triton_kernels):
    """S = 0 (nothing to launch) still returns outputs and zero parameter gradients."""
    leaves = make_inputs(2, 0, 72, 2, torch.float32)
    (x_new, out), grads = run(ours, leaves, 2, 0, True, [torch.zeros(2, 0, 72)] * 2)
    assert x_new.shape == out.shape == (2, 0, 72)
    assert all(not g.any() for g in grads.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_deterministic(triton_kernels, dtype):
    leaves = make_inputs(2, 13, 72, 2, dtype)
    gout = [torch.randn(2, 13, 72).to(dtype) for _ in range(2)]
    first = run(ours, leaves, 2, 6, True, gout)[1]
    second = run(ours, leaves, 2, 6, True, gout)[1]
    for k in first:
        assert torch.equal(first[k], second[k]), f"d{k} differs between two identical backward passes"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["adaln", "residual"])
def test_cpu_default_runs_reference(monkeypatch, residual, dtype):
    """Without COGVIDEOX_KERNELS the CPU op is the reference; its pure-torch backward matches autograd through it."""
    monkeypatch.delenv("COGVIDEOX_KERNELS", raising=False)
    leaves = make_inputs(2, 9, 72, 2, dtype)
    x, y, gate, shift, scale, w, b = views(leaves, 2)
    if residual:
        got = expert_adaln_residual(x, y, gate, shift, scale, 4, w, b)
        want = expert_adaln_residual_ref(x, y, gate, shift, scale, 4, w, b)
    else:
        got = (expert_adaln(x, shift, scale, 4, w, b),)
        want = (expert_adaln_ref(x, shift, scale, 4, w, b),)
    for a, r in zip(got, want):
        assert torch.equal(a, r)
    gout = [torch.randn_like(t) for t in got]
    inputs = [leaves[k] for k in ("x", "y", "mod", "weight", "bias") if residual or k != "y"]
    for a, r in zip(torch.autograd.grad(got, inputs, gout), torch.autograd.grad(want, inputs, gout)):
        if dtype == torch.float32:
            assert_parity(a, r)
        else:   # both round to bf16, from fp32 values that differ in the last bits
            assert_parity(a.float(), r.float(), atol=torch.finfo(dtype).eps * r.abs().max().item())


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_opcheck(monkeypatch, path):
    monkeypatch.setenv("COGVIDEOX_KERNELS", path)
    leaves = make_inputs(2, 7, 72, 2, torch.float32)
    x, y, gate, shift, scale, w, b = (t.detach().requires_grad_() for t in views(leaves, 2))
    dout = torch.randn(2, 7, 72)
    mean, rstd = ea._row_stats(x.detach(), EPS)
    samples = [
        (torch.ops.cogvideox.expert_adaln, (x, shift, scale, 3, w, b, EPS)),
        (torch.ops.cogvideox.expert_adaln, (x, shift[:, :1], scale[:, :1], 3, None, None, EPS)),
        (torch.ops.cogvideox.expert_adaln_residual, (x, y, gate, shift, scale, 3, w, b, EPS)),
        (torch.ops.cogvideox.expert_adaln_bwd, (dout, dout, x.detach(), mean, rstd, y.detach(), gate.detach(),
                                                scale.detach(), 3, w.detach(), None)),
        (torch.ops.cogvideox.expert_adaln_bwd, (dout, None, x.detach(), mean, rstd, None, None, scale.detach(), 3,
                                                None, b.detach())),
        # a context-parallel shard: offset 2, text_len 3 -> one text row
        (torch.ops.cogvideox.expert_adaln_residual, (x, y, gate, shift, scale, 3, w, b, EPS, 2)),
        (torch.ops.cogvideox.expert_adaln_bwd, (dout, dout, x.detach(), mean, rstd, y.detach(), gate.detach(),
                                                scale.detach(), 3, w.detach(), b.detach(), 2)),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_compile_fullgraph(monkeypatch, path):
    """Zero graph breaks, forward and backward, over three sequence lengths; at most two compiles."""
    monkeypatch.setenv("COGVIDEOX_KERNELS", path)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")  # aot_eager traces the backward too

    def block(x, y, gate, shift, scale, w, b):
        x_new, out = expert_adaln_residual(x, y, gate, shift, scale, 3, w, b)
        return x_new * 2 + expert_adaln(out, shift, scale, 3, w, b)

    compiled = torch.compile(block, backend=counter, fullgraph=True)
    for S in (6, 9, 12):
        leaves = make_inputs(2, S, 72, 2, torch.float32, seed=S)
        args = views(leaves, 2)
        inputs = list(leaves.values())
        got = compiled(*args)
        want = block(*args)
        torch.testing.assert_close(got, want)
        g_got = torch.autograd.grad(got.square().sum(), inputs)   # the compiled backward graph
        g_want = torch.autograd.grad(want.square().sum(), inputs)
        for a, r in zip(g_got, g_want):
            torch.testing.assert_close(a, r)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert 1 <= counter.frame_count <= 2, f"{counter.frame_count} compiles over three sequence lengths"


def _good(dtype=torch.float32):
    x = torch.randn(2, 5, 8, dtype=dtype)
    return dict(x=x, y=torch.randn_like(x), gate=torch.randn(2, 2, 8, dtype=dtype),
                shift=torch.randn(2, 2, 8, dtype=dtype), scale=torch.randn(2, 2, 8, dtype=dtype), text_len=2,
                weight=torch.randn(8), bias=torch.randn(8))


BAD = [  # (what changes, exception, message fragment)
    ({"x": [[1.0]]}, TypeError, "x must be a torch.Tensor"),
    ({"x": torch.randn(2, 5, 8).to(torch.int32)}, TypeError, "x must have dtype"),
    ({"x": torch.randn(10, 8)}, ValueError, "x must be 3-D"),
    ({"y": torch.randn(2, 4, 8)}, ValueError, "y must have the shape of x"),
    ({"y": torch.randn(2, 5, 8, dtype=torch.float64)}, TypeError, "y must have dtype"),
    ({"y": torch.randn(2, 5, 8, dtype=torch.bfloat16)}, TypeError, "y has dtype"),
    ({"shift": torch.randn(2, 2, 8, dtype=torch.bfloat16)}, TypeError, "shift has dtype"),
    ({"shift": torch.randn(2, 2, 8, device="meta")}, ValueError, "shift is on meta"),
    ({"gate": torch.randn(2, 3, 8), "shift": torch.randn(2, 3, 8), "scale": torch.randn(2, 3, 8)}, ValueError,
     "E in (1, 2)"),
    ({"scale": torch.randn(2, 1, 8)}, ValueError, "scale must have shape (2, 2, 8)"),
    ({"shift": torch.randn(1, 2, 8)}, ValueError, "shift must have shape (2, 2, 8)"),
    ({"scale": torch.randn(2, 2, 7)}, ValueError, "scale must have shape (2, 2, 8)"),
    ({"gate": torch.randn(2, 8)}, ValueError, "gate must be 3-D"),
    ({"weight": torch.randn(7)}, ValueError, "weight must have shape (8,)"),
    ({"bias": torch.randn(1, 8)}, ValueError, "bias must be 1-D"),
    ({"weight": torch.randn(8, dtype=torch.float64)}, TypeError, "weight must have dtype"),
    ({"text_len": 2.0}, TypeError, "text_len must be an int"),
    ({"text_len": True}, TypeError, "text_len must be an int"),
    ({"text_len": -1}, ValueError, "text_len must be >= 0, got -1"),
    ({"offset": -1}, ValueError, "offset must be >= 0, got -1"),
    ({"offset": 2.0}, TypeError, "offset must be an int, got float"),
    ({"offset": True}, TypeError, "offset must be an int, got bool"),
    ({"offset": None}, TypeError, "offset must be an int, got NoneType"),
    ({"eps": 0.0}, ValueError, "eps must be a finite number > 0, got 0.0"),
    ({"eps": -1e-5}, ValueError, "eps must be a finite number > 0, got -1e-05"),
    ({"eps": float("nan")}, ValueError, "eps must be a finite number > 0, got nan"),
    ({"eps": float("inf")}, ValueError, "eps must be a finite number > 0, got inf"),
    ({"eps": None}, TypeError, "eps must be a real number, got NoneType"),
    ({"eps": "1e-5"}, TypeError, "eps must be a real number, got str"),
]


@pytest.mark.parametrize("change, exc, msg", BAD, ids=[b[2] for b in BAD])
def test_bad_input(change, exc, msg):
    kw = {**_good(), **change}
    with pytest.raises(exc) as info:
        expert_adaln_residual(**kw)
    assert msg in str(info.value)
    if "y" not in change and "gate" not in change:   # expert_adaln runs the same checks
        kw.pop("y"), kw.pop("gate")
        with pytest.raises(exc) as info:
            expert_adaln(**kw)
        assert msg in str(info.value)


# Context-parallel shards of one joint sequence (S = 13, text_len = 5): boundaries of the shards, in order.
# Offsets 0, 3 (mid-text, and a shard wholly inside the text: text_len > offset + S), 5 (exactly text_len),
# 9 (mid-vision), uneven sizes; a shard straddling the text/vision boundary; one-row shards.
SHARDINGS = [(0, 3, 5, 9, 13), (0, 7, 8, 13), (0, 1, 2, 6, 12, 13)]


def _sharded(fn, leaves, E, text_len, residual, bounds):
    """fn on every shard x[:, lo:hi] (y likewise) with offset=lo; outputs concatenated along S."""
    x, y, gate, shift, scale, w, b = views(leaves, E)
    outs = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if residual:
            outs.append(fn(x[:, lo:hi], y[:, lo:hi], gate, shift, scale, text_len, w, b, EPS, offset=lo))
        else:
            outs.append((fn(x[:, lo:hi], shift, scale, text_len, w, b, EPS, offset=lo),))
    return tuple(torch.cat(o, dim=1) for o in zip(*outs))


@pytest.mark.parametrize("bounds", SHARDINGS, ids=lambda b: "-".join(map(str, b)))
@pytest.mark.parametrize("residual", [False, True], ids=["adaln", "residual"])
@pytest.mark.parametrize("path", ["torch", "triton"])
def test_context_parallel_offset(monkeypatch, path, residual, bounds):
    """op(x[:, lo:hi], offset=lo) is op(x)[:, lo:hi] bit for bit in fp32 (each row sees the same arithmetic), on
    the reference path and in the interpreter; so is the input gradient of every shard; the modulation and
    LayerNorm parameter gradients summed over the shards equal the full ones (1e-5 relative)."""
    monkeypatch.setenv("COGVIDEOX_KERNELS", path)
    monkeypatch.setattr(ea, "num_sms", lambda device: 4)     # several programs per shard in the backward
    leaves = make_inputs(2, 13, 72, 2, torch.float32)
    names = [k for k in ("x", "y", "mod", "weight", "bias") if residual or k != "y"]
    n_out = 2 if residual else 1
    gout = [torch.randn(2, 13, 72, generator=torch.Generator().manual_seed(3)) for _ in range(n_out)]
    fn = expert_adaln_residual if residual else expert_adaln
    full = run(ours, leaves, 2, 5, residual, gout)
    sharded = _sharded(fn, leaves, 2, 5, residual, bounds)
    grads = dict(zip(names, torch.autograd.grad(sharded, [leaves[k] for k in names], gout)))
    for a, r in zip(sharded, full[0]):
        assert torch.equal(a, r)
    for k in names:
        if k in ("x", "y"):
            assert torch.equal(grads[k], full[1][k]), f"d{k}"
        else:
            assert_parity(grads[k], full[1][k], atol=1e-6, name=f"d{k}")


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_offset_text_only_and_vision_only_shards(monkeypatch, path):
    """A shard wholly inside the text (text_len > offset + S) is modulated by expert 0 alone, one wholly inside the
    vision by expert 1 alone: the same as an E = 1 call with that expert's vectors."""
    monkeypatch.setenv("COGVIDEOX_KERNELS", path)
    x, y, gate, shift, scale, w, b = views(make_inputs(2, 6, 72, 2, torch.float32), 2)
    for offset, text_len, e in ((0, 10, 0), (4, 10, 0), (3, 3, 1), (7, 2, 1)):
        one = [t[:, e:e + 1] for t in (gate, shift, scale)]
        got = expert_adaln_residual(x, y, gate, shift, scale, text_len, w, b, EPS, offset=offset)
        want = expert_adaln_residual(x, y, *one, 0, w, b, EPS)
        for a, r in zip(got, want):
            assert torch.equal(a, r), (offset, text_len)


def _constant_leaves(D, residual, affine, seed=0):
    """Leaves (as make_inputs) whose LayerNorm input rows are constant: x rows of one value each (12345.678 and
    98765.4 among them), and for the residual a constant-per-row y and a gate constant over D, so that every
    x_new row is one value too (lane by lane the same arithmetic)."""
    g = torch.Generator().manual_seed(seed)
    consts = torch.tensor([12345.678, 98765.4, -3.25, 0.0, 7.0e4])
    B, S = 1, consts.numel()
    x = consts.view(1, S, 1).expand(B, S, D).clone().requires_grad_()
    y = (torch.tensor([2.0, -1.5, 0.0, 3.0, 1.0]).view(1, S, 1).expand(B, S, D).clone().requires_grad_()
         if residual else torch.zeros(B, S, D))
    mod = (0.5 * torch.randn(B, 6, D, generator=g))
    mod[:, 2], mod[:, 5] = 0.37, -0.61                        # both experts' gates: constant over D
    mod = mod.view(B, 6 * D).requires_grad_()
    weight = (1 + 0.3 * torch.randn(D, generator=g)).requires_grad_() if affine else None
    bias = (0.3 * torch.randn(D, generator=g)).requires_grad_() if affine else None
    return {"x": x, "y": y, "mod": mod, "weight": weight, "bias": bias}


@pytest.mark.parametrize("D", [64, 1000, 3072])
@pytest.mark.parametrize("residual", [False, True], ids=["adaln", "residual"])
@pytest.mark.parametrize("path", ["torch", "triton"])
def test_constant_rows(monkeypatch, path, residual, D):
    """Issue 12: a row of equal values normalizes to exactly 0, as F.layer_norm gives (the Triton path gave 0.295
    at 12345.678 and 0.98 at 98765.4: the fp32 mean's rounding error times rsqrt(eps)); with the affine and the
    modulation, out = bias * (1 + scale) + shift; the backward is finite and matches fp64 autograd."""
    monkeypatch.setenv("COGVIDEOX_KERNELS", path)
    leaves = _constant_leaves(D, residual, affine=False)
    x, y, gate, shift, scale, w, b = views(leaves, 2)
    zeros = torch.zeros_like(shift)
    out = ours(x, y, gate, zeros, zeros, 2, None, None, residual)[-1]
    assert torch.equal(out, torch.zeros_like(out))
    leaves = _constant_leaves(D, residual, affine=True)
    gout = [torch.randn(1, 5, D, generator=torch.Generator().manual_seed(2)) for _ in range(1 + residual)]
    o_ours, g_ours = run(ours, leaves, 2, 2, residual, gout)
    o_ref, g_ref = run(plain, to64(leaves), 2, 2, residual, [t.double() for t in gout])
    for a, r in zip(o_ours, o_ref):
        assert_parity(a, r, name="out")
    for k in g_ref:
        assert torch.isfinite(g_ours[k]).all(), f"d{k}"
        assert_parity(g_ours[k], g_ref[k], name=f"d{k}")


@pytest.mark.parametrize("D", [64, 3072])
@pytest.mark.parametrize("path", ["torch", "triton"])
def test_near_constant_rows(monkeypatch, path, D):
    """Rows 12345.678 + 1e-3 randn (fp32 ulp there is ~1e-3): forward and gradients err at most 2x torch's own fp32
    LayerNorm vs fp64 (torch's fp32 F.layer_norm errs by ~0.1 on such rows; the shifted Triton statistics ~1e-7;
    the old Triton kernel erred 0.76 at D = 3072)."""
    monkeypatch.setenv("COGVIDEOX_KERNELS", path)
    g = torch.Generator().manual_seed(4)
    leaves = make_inputs(2, 6, D, 2, torch.float32)
    leaves["x"] = (12345.678 + 1e-3 * torch.randn(2, 6, D, generator=g, dtype=torch.float64)).float().requires_grad_()
    gout = [torch.randn(2, 6, D, generator=g)]
    o_ours, g_ours = run(ours, leaves, 2, 3, False, gout)
    o_ref, g_ref = run(plain, to64(leaves), 2, 3, False, [t.double() for t in gout])
    o_pl, g_pl = run(plain, leaves, 2, 3, False, gout)
    pairs = [("out", o_ours[0], o_ref[0], o_pl[0])] + [(f"d{k}", g_ours[k], g_ref[k], g_pl[k]) for k in g_ref]
    for name, a, r, p in pairs:
        err, plain_err = max_err(a, r), max_err(p, r)
        assert err <= 2 * plain_err + 1e-5 * r.abs().max().item(), f"{name}: {err:.3e} vs torch fp32 {plain_err:.3e}"


def test_row_width_limit(triton_kernels, monkeypatch):
    """D up to MAX_D runs; beyond, a ValueError naming the limit instead of a raw Triton error, on every path."""
    D = ea.MAX_D
    x, shift, scale = torch.randn(1, 2, D), torch.randn(1, 1, D), torch.randn(1, 1, D)
    assert_parity(expert_adaln(x, shift, scale, 0), expert_adaln_ref(x.double(), shift.double(), scale.double(), 0))
    x, shift = torch.randn(1, 1, D + 1), torch.randn(1, 1, D + 1)
    for path in ("triton", "torch"):
        monkeypatch.setenv("COGVIDEOX_KERNELS", path)
        with pytest.raises(ValueError, match=f"more than the kernels' limit of {D}"):
            expert_adaln(x, shift, shift, 0)
        with pytest.raises(ValueError, match=f"more than the kernels' limit of {D}"):
            expert_adaln_residual(x, x, shift, shift, shift, 0)


def test_documented_module_attributes():
    """README: kernels.expert_adaln.launch_config works although kernels.expert_adaln is the (callable) op."""
    import kernels
    assert callable(kernels.expert_adaln)
    assert kernels.expert_adaln.launch_config is ea.launch_config
    assert kernels.expert_adaln.expert_rows is ea.expert_rows and kernels.expert_adaln.expert_sum is ea.expert_sum
    assert kernels.expert_adaln.launch_config(2, 17776, 3072, 132)["BLOCK_D"] == 4096


# CogVideoX shapes (arXiv 2408.06072 Table 1; 226 text + 13 x 30 x 45 vision tokens) the AOT build is checked at.
COGVIDEOX = {"2b": dict(B=2, S=17776, D=1920), "5b": dict(B=2, S=17776, D=3072)}


def _aot_build(shape, dtype, residual, kernel, varlen=0):
    """compile_sm90 of one kernel variant at the block size and warps the launcher picks on an H100 (132 SMs).
    varlen: the packed variant (shape's B segments of up to S tokens each)."""
    cfg = ea.launch_config(**shape, n_sm=132, itemsize=4 if dtype == "fp32" else 2)
    if kernel == "fwd":
        fn, warps = ea._expert_adaln_fwd_kernel, cfg["fwd_warps"]
        ptrs = "X Y XN OUT GATE SHIFT SCALE W Bias"
        strides, flags = "s_xb s_xs s_yb s_ys s_gb s_ge s_hb s_he s_cb s_ce", {}
    else:
        fn, warps = ea._expert_adaln_bwd_kernel, cfg["bwd_warps"]
        ptrs = "DOUT DXN X Y GATE SCALE W Bias DX DY"
        strides, flags = "s_xb s_xs s_yb s_ys s_gb s_ge s_cb s_ce", {"HAS_DXN": residual}
    sig = {n: "*" + dtype for n in ptrs.split()}
    sig.update({n: "*fp32" for n in ("MEAN", "RSTD", "PART") if n in fn.arg_names})
    sig.update(CU="*i32", SEG_TL="*i32")                    # dense launches pass None: unused there
    sig = {n: sig[n] for n in fn.arg_names if n in sig}     # in the kernel's argument order
    sig.update({n: "i32" for n in ("S", "D", "text_len", "rows_per_prog")})
    if kernel == "fwd":
        sig["eps"] = "fp32"
    sig.update({n: "i32" for n in strides.split()})        # S*D and 6D fit in int32, as passed at launch
    consts = dict(E=2, HAS_RESIDUAL=residual, HAS_WEIGHT=1, HAS_BIAS=1, BLOCK_D=cfg["BLOCK_D"],
                  STAGES=cfg["STAGES"], VARLEN=varlen, **flags)
    sig.update({k: "constexpr" for k in consts})
    # What the JIT specializes at these shapes: 16-byte aligned buffers, S = 16 * 1111, D and strides
    # multiples of 16 (text_len = 226 and rows_per_prog are not).
    div16 = [n for n, t in sig.items() if t.startswith("*")] + ["S", "D"] + strides.split()
    info = compile_sm90(fn, sig, consts, num_warps=warps, divisible_by_16=div16)
    muls = [ln.strip() for ln in info.ttir.splitlines() if "arith.muli" in ln]
    return dict(dtype=dtype, residual=residual, kernel=kernel, warps=warps, n_regs=info.n_regs, spills=info.spills,
                muls=muls, shared=info.shared_bytes, loops=_row_loops(info.ptx))


def _row_loops(ptx):
    """Per innermost loop of the PTX (the row loop of each expert segment): bar.sync count, vector global loads
    (ld.global.v*, issued in place) and cp.async copies (the pipeliner's prefetch into shared memory)."""
    loops, body = [], None
    for line in ptx.splitlines():
        if "Inner Loop Header" in line:
            body = []
        elif body is not None:
            body.append(line)
            if re.search(r"@%p\d+ bra", line):
                text = "\n".join(body)
                loops.append(dict(bar_sync=text.count("bar.sync"), cp_async=text.count("cp.async.c"),
                                  vector_ld_global=len(re.findall(r"ld\.global(\.\w+)*\.v\d", text))))
                body = None
    return loops


@pytest.fixture(scope="module")
def aot_results():
    pytest.importorskip("triton.backends.nvidia", reason="triton's NVIDIA backend is needed for the AOT build")
    return [dict(model=model, **_aot_build(shape, dtype, residual, kernel))
            for model, shape in COGVIDEOX.items()
            for dtype in ("fp32", "bf16", "fp16")
            for residual in ((0, 1) if dtype == "bf16" else (1,))          # the residual variant is the larger one
            for kernel in ("fwd", "bwd")]


def test_aot_sm90_no_spills(aot_results):
    assert len(aot_results) == 2 * 4 * 2
    for r in aot_results:
        assert not r["spills"], f"register spills: {r}"
        # Memory-bound kernels need warps in flight: <= 128 registers keeps 16 warps resident per SM (2 x 8 or 1 x 16).
        assert r["n_regs"] <= 128, f"{r['n_regs']} registers: occupancy too low for a memory-bound kernel ({r})"


def test_aot_pipelined_row_loop(aot_results):
    """Issue 10: the row loops load nothing in place but scalars (every row vector comes through cp.async, issued
    rows ahead of the reductions), and a backward row waits at 3 barriers (the pipeline's, and one reduction of
    sum(dxhat * xhat) and sum(dxhat) together), a forward row at 4. The old backward: 8, with the dx_new and y
    loads behind all of them."""
    for r in aot_results:
        assert len(r["loops"]) == 2, r["loops"]                  # one row loop per expert segment
        for loop in r["loops"]:
            assert loop["vector_ld_global"] == 0 and loop["cp_async"] > 0, (r["model"], r["kernel"], loop)
            assert loop["bar_sync"] <= (3 if r["kernel"] == "bwd" else 4), (r["model"], r["kernel"], loop)


HOPPER_SMEM = 227 * 1024   # the most shared memory one program may use on sm_90


def test_aot_pipeline_fits_shared_memory(aot_results):
    """The pipeline's shared memory fits a Hopper program at CogVideoX widths, and at wider rows, where
    launch_config drops stages (the launch would fail otherwise; the interpreter would not notice)."""
    for r in aot_results:
        assert r["shared"] <= HOPPER_SMEM, r
    wide = _aot_build(dict(B=2, S=4096, D=16384), "bf16", 1, "bwd")       # 2 stages of 4 x 32 KB rows
    assert 64 * 1024 < wide["shared"] <= HOPPER_SMEM, wide


def test_aot_int64_offsets(aot_results):
    """Batch and row indices are widened before they meet a stride: every row offset multiply is i64. The only
    i32 multiplies left are pid * rows_per_prog (< S) and the program count (< 2^16)."""
    for r in aot_results:
        assert any(m.endswith(": i64") or ": i64 loc" in m for m in r["muls"]), r["muls"]
        narrow = [m for m in r["muls"] if m.endswith(": i32") or ": i32 loc" in m]
        assert all(m.startswith(("%lo", "%plane")) for m in narrow), narrow


# the largest: CogVideoX1.5-5B at 768 x 1360, 81 frames: 226 text + 11 x 48 x 85 vision tokens
LARGEST = dict(B=2, S=45106, D=3072)


def test_launch_config():
    """What the AOT tests compile is what the launcher picks; the backward stays at about two programs per SM, the
    forward at about four; 8 elements per thread; 3 pipeline stages for half types, 2 for fp32."""
    for shape in [*COGVIDEOX.values(), LARGEST]:
        cfg = ea.launch_config(**shape, n_sm=132)
        assert cfg["BLOCK_D"] >= shape["D"] and cfg["BLOCK_D"] < 2 * shape["D"]
        assert cfg["bwd_progs"] * shape["B"] <= 2 * 132 and cfg["bwd_rows"] * cfg["bwd_progs"] >= shape["S"]
        assert cfg["fwd_progs"] * shape["B"] <= 4 * 132
        assert (cfg["fwd_progs"] - 1) * cfg["fwd_rows"] < shape["S"] <= cfg["fwd_progs"] * cfg["fwd_rows"]
        assert cfg["BLOCK_D"] // (32 * cfg["bwd_warps"]) == 8 and cfg["BLOCK_D"] // (32 * cfg["fwd_warps"]) == 8
        assert cfg["STAGES"] == 3 and ea.launch_config(**shape, n_sm=132, itemsize=4)["STAGES"] == 2


@pytest.mark.parametrize("B", [1, 2, 65536, 2**20])
def test_grid_within_cuda_limits(B):
    """Grid (B, programs per sample): the interpreter takes any grid, CUDA only 65535 on axis 1. The program count
    stays near 4 (forward) and 2 (backward) per SM whatever B and S are, so any batch launches."""
    for n_sm in (1, 132):
        cfg = ea.launch_config(B, LARGEST["S"], LARGEST["D"], n_sm)
        for progs in (cfg["fwd_progs"], cfg["bwd_progs"]):
            assert check_grid((B, progs)) == (B, progs)
    with pytest.raises(ValueError, match="too large for one launch"):
        check_grid((1, 65536))


# Packed (varlen) sequences: several [text | vision] segments end to end in one (1, N, D) tensor, each with its own
# modulation row (kernels.Segments). "mixed": lengths 9, 8, 4, 6; segment 1 has no text, segment 2 no vision, and
# with num_sms = 4 the programs are sized for the longest (forward 3 x 3 rows, backward 2 x 5), so the short
# segments leave programs empty. "empty": a zero-length segment between two others.
LAYOUTS = {
    "mixed": ((3, 0, 4, 1), ((1, 2, 3), (2, 2, 2), (0, 0, 0), (1, 1, 5))),
    "empty": ((2, 0, 5), ((1, 1, 3), (0, 0, 0), (1, 1, 1))),
}


def packed_inputs(layout, D, dtype, affine=True, seed=0):
    """make_inputs' leaves for one packed (1, N, D) row (x, y non-contiguous slices), with one (6D) modulation row
    per segment; -> (leaves, segments)."""
    seg = Segments(*LAYOUTS[layout])
    leaves = make_inputs(1, seg.total, D, 2, dtype, affine, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    leaves["mod"] = (0.5 * torch.randn(seg.n, 6 * D, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    return leaves, seg


def plain_packed(x, y, gate, shift, scale, seg, weight, bias, residual):
    """plain() with per-segment modulation rows (segment_rows), op by op in the inputs' dtype."""
    D = x.shape[2]
    if residual:
        x = x + segment_rows(gate, seg) * y
    out = F.layer_norm(x, (D,), weight, bias, EPS) * (1 + segment_rows(scale, seg)) + segment_rows(shift, seg)
    return (x, out) if residual else (out,)


def ours_packed(x, y, gate, shift, scale, seg, weight, bias, residual):
    if residual:
        return expert_adaln_residual(x, y, gate, shift, scale, None, weight, bias, EPS, segments=seg)
    return (expert_adaln(x, shift, scale, None, weight, bias, EPS, segments=seg),)


def alone(x, y, gate, shift, scale, seg, weight, bias, residual):
    """Each segment as its own B = 1 call (its rows, its modulation row, its text length), concatenated."""
    outs = [ours(x[:, a:b], y[:, a:b], gate[i:i + 1], shift[i:i + 1], scale[i:i + 1], seg.text_lens[i], weight,
                 bias, residual) for i, (a, b) in enumerate(seg.ranges())]
    return tuple(torch.cat(o, dim=1) for o in zip(*outs))


def check_packed(layout, D, E, dtype, residual, affine=True):
    """Packed against fp64 (the parity rule) and against each segment alone: outputs, dx and dy bit for bit (every
    row sees the same arithmetic); the summed gradients (modulation, weight, bias) to summation order."""
    leaves, seg = packed_inputs(layout, D, dtype, affine)
    N = seg.total
    g = torch.Generator().manual_seed(7)
    gout = [torch.randn(1, N, D, generator=g).to(dtype) for _ in range(1 + residual)]
    o_ours, g_ours = run(ours_packed, leaves, E, seg, residual, gout)
    o_ref, g_ref = run(plain_packed, to64(leaves), E, seg, residual, [t.double() for t in gout])
    o_pl, g_pl = run(plain_packed, leaves, E, seg, residual, gout)
    for name, a, r, p in zip(["x_new", "out"][-len(gout):], o_ours, o_ref, o_pl):
        assert_parity(a, r, p, atol=_atol(r, dtype), name=name)
    for k in g_ref:
        assert_parity(g_ours[k], g_ref[k], g_pl[k], atol=_atol(g_ref[k], dtype), name=f"d{k}")
    o_alone, g_alone = run(alone, leaves, E, seg, residual, gout)
    for a, r in zip(o_ours, o_alone):
        assert torch.equal(a, r)
    for k in g_alone:
        if k in ("x", "y"):
            assert torch.equal(g_ours[k], g_alone[k]), f"d{k}"
        elif dtype == torch.float32:
            assert_parity(g_ours[k], g_alone[k], atol=1e-6, name=f"d{k}")
        else:   # fp32 sums of a different program split, each rounded once to dtype
            ulp = torch.finfo(dtype).eps * g_alone[k].abs().max().item()
            assert_parity(g_ours[k].float(), g_alone[k].float(), atol=ulp, name=f"d{k}")
    return seg


def _sms4(monkeypatch):
    """Several programs per segment (see LAYOUTS); asserts that some program of the backward has no rows."""
    monkeypatch.setattr(ea, "num_sms", lambda device: 4)
    seg = Segments(*LAYOUTS["mixed"])
    cfg = ea.launch_config(seg.n, seg.max_len, 72, 4)
    assert min(seg.lengths) <= (cfg["bwd_progs"] - 1) * cfg["bwd_rows"], cfg
    assert min(seg.lengths) <= (cfg["fwd_progs"] - 1) * cfg["fwd_rows"], cfg


@pytest.mark.parametrize("residual", [False, True], ids=["adaln", "residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("E", [1, 2])
def test_packed_parity_triton(triton_kernels, monkeypatch, E, dtype, residual):
    _sms4(monkeypatch)
    check_packed("mixed", 72, E, dtype, residual)


def test_packed_empty_segment_triton(triton_kernels, monkeypatch):
    _sms4(monkeypatch)
    check_packed("empty", 72, 2, torch.float32, True)


@pytest.mark.parametrize("residual", [False, True], ids=["adaln", "residual"])
def test_packed_torch_path(torch_kernels, residual):
    """The CPU op (reference forward, pure-torch backward) on packed input: the same checks."""
    check_packed("mixed", 72, 2, torch.float32, residual)


def test_packed_every_element_written(triton_kernels, monkeypatch):
    """NaN-filled outputs, gradients and partials (5 planes, with programs past the end of short segments)."""
    _sms4(monkeypatch)
    monkeypatch.setattr(ea, "_alloc", lambda *a, **k: poison_like(torch.empty(*a, **k)))
    check_packed("mixed", 72, 2, torch.float32, True)
    check_packed("empty", 72, 1, torch.float32, False, affine=False)


def test_packed_backward_deterministic(triton_kernels, monkeypatch):
    _sms4(monkeypatch)
    leaves, seg = packed_inputs("mixed", 72, torch.bfloat16)
    gout = [torch.randn(1, seg.total, 72).to(torch.bfloat16) for _ in range(2)]
    first = run(ours_packed, leaves, 2, seg, True, gout)[1]
    second = run(ours_packed, leaves, 2, seg, True, gout)[1]
    for k in first:
        assert torch.equal(first[k], second[k]), f"d{k} differs between two identical backward passes"


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_packed_opcheck(monkeypatch, path):
    """The schema, fake and autograd registrations with the layout arguments (a zero-length segment among them)."""
    monkeypatch.setenv("COGVIDEOX_KERNELS", path)
    leaves, seg = packed_inputs("empty", 72, torch.float32)
    x, y, gate, shift, scale, w, b = (t.detach().requires_grad_() for t in views(leaves, 2))
    layout = (seg.cu_seqlens, seg.text_lens_t, seg.max_len)
    dout = torch.randn(1, seg.total, 72)
    mean, rstd = ea._row_stats(x.detach(), EPS)
    samples = [
        (torch.ops.cogvideox.expert_adaln, (x, shift, scale, 0, w, b, EPS, 0, *layout)),
        (torch.ops.cogvideox.expert_adaln, (x, shift[:, :1], scale[:, :1], 0, None, None, EPS, 0, *layout)),
        (torch.ops.cogvideox.expert_adaln_residual, (x, y, gate, shift, scale, 0, w, b, EPS, 0, *layout)),
        (torch.ops.cogvideox.expert_adaln_bwd, (dout, dout, x.detach(), mean, rstd, y.detach(), gate.detach(),
                                                scale.detach(), 0, w.detach(), b.detach(), 0, *layout)),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)


def _packed_good():
    seg = Segments(*LAYOUTS["mixed"])
    x = torch.randn(1, seg.total, 8)
    mod = {k: torch.randn(seg.n, 2, 8) for k in ("gate", "shift", "scale")}
    return dict(x=x, y=torch.randn_like(x), text_len=None, segments=seg, **mod)


PACKED_BAD = [  # (what changes, exception, message fragment)
    ({"text_len": 3}, ValueError, "text_len must be None when segments are given"),
    ({"offset": 2}, ValueError, "offset must be 0 when segments are given"),
    ({"x": torch.randn(1, 28, 8), "y": torch.randn(1, 28, 8)}, ValueError, "x must be a packed (1, N=27, ...)"),
    ({"x": torch.randn(2, 27, 8), "y": torch.randn(2, 27, 8)}, ValueError, "x must be a packed (1, N=27, ...)"),
    ({"shift": torch.randn(3, 2, 8)}, ValueError, "shift must have shape (4, 2, 8)"),
    ({"gate": torch.randn(1, 2, 8)}, ValueError, "gate must have shape (4, 2, 8)"),
    ({"segments": (3, 0, 4, 1)}, TypeError, "segments must be a kernels.Segments"),
]


@pytest.mark.parametrize("change, exc, msg", PACKED_BAD, ids=[b[2] for b in PACKED_BAD])
def test_packed_bad_input(change, exc, msg):
    kw = {**_packed_good(), **change}
    with pytest.raises(exc) as info:
        expert_adaln_residual(**kw)
    assert msg in str(info.value)
    if "gate" not in change:   # expert_adaln runs the same checks
        kw.pop("y"), kw.pop("gate")
        with pytest.raises(exc) as info:
            expert_adaln(**kw)
        assert msg in str(info.value)


def test_aot_varlen():
    """The packed build at 5B (4 segments of up to 17,776 tokens, bf16, residual): as the dense one, no spills,
    <= 128 registers, row vectors through cp.async, the same barriers a row, i64 row offsets."""
    pytest.importorskip("triton.backends.nvidia", reason="triton's NVIDIA backend is needed for the AOT build")
    for kernel in ("fwd", "bwd"):
        r = _aot_build(dict(B=4, **{k: COGVIDEOX["5b"][k] for k in ("S", "D")}), "bf16", 1, kernel, varlen=1)
        assert not r["spills"] and r["n_regs"] <= 128, r
        assert len(r["loops"]) == 2, r["loops"]
        for loop in r["loops"]:
            assert loop["vector_ld_global"] == 0 and loop["cp_async"] > 0, (kernel, loop)
            assert loop["bar_sync"] <= (3 if kernel == "bwd" else 4), (kernel, loop)
        narrow = [m for m in r["muls"] if m.endswith(": i32") or ": i32 loc" in m]
        assert all(m.startswith(("%lo", "%plane")) for m in narrow), narrow


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_packed_compile_fullgraph(monkeypatch, path):
    """A packed block compiles without graph breaks (the layout's tensors are graph inputs), forward and backward."""
    monkeypatch.setenv("COGVIDEOX_KERNELS", path)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    leaves, seg = packed_inputs("empty", 16, torch.float32)

    def block(x, y, gate, shift, scale, w, b):
        x_new, out = expert_adaln_residual(x, y, gate, shift, scale, None, w, b, segments=seg)
        return x_new * 2 + expert_adaln(out, shift, scale, None, w, b, segments=seg)

    args, inputs = views(leaves, 2), list(leaves.values())
    got = torch.compile(block, backend=counter, fullgraph=True)(*args)
    want = block(*args)
    torch.testing.assert_close(got, want)
    for a, r in zip(torch.autograd.grad(got.square().sum(), inputs), torch.autograd.grad(want.square().sum(), inputs)):
        torch.testing.assert_close(a, r)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert counter.frame_count == 1
