"""causal_pad3d: Triton kernels (interpreter, or CUDA under COGVIDEOX_TEST_DEVICE) vs the reference, registration,
compile, errors. The compiled-code properties (sm_90 builds at the real launch arguments) are in test_inspect.py."""
import re
import sys

import pytest
import torch
import torch._dynamo.testing

import kernels.causal_pad3d  # noqa: F401  (the package re-exports the function under the same name)
from conftest import TEST_DEVICE, assert_parity

cp = sys.modules["kernels.causal_pad3d"]
causal_pad3d, causal_pad3d_ref = cp.causal_pad3d, cp.causal_pad3d_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (kernel_t, T, pad_hw, with_cache): CogVideoX's k3/pad 1 convs on a first chunk (T = 1, 3) and a cached chunk,
# k1 (no temporal pad), k2, T < kernel_t - 1 (the cache then holds front frames), an uneven spatial pad
CASES = [(3, 1, (1, 1), False), (3, 3, (1, 1), True), (1, 2, (0, 0), False), (2, 3, (2, 1), True),
         (4, 2, (0, 1), True), (3, 2, (1, 0), False), (4, 2, (0, 0), True), (3, 1, (0, 0), False)]
# the interpreter is slow: modes CogVideoX does not use get the cases that exercise their own code paths
# (the last two first-mode cases: no spatial pad, as the VAE calls it, so the flat kernels run)
MODE_CASES = {"first": CASES, "zeros": [CASES[1], CASES[4], CASES[5], CASES[6]],
              "replicate": [(3, 1, (1, 1), False), (2, 3, (2, 1), False), (1, 2, (0, 1), False),
                            (3, 2, (0, 0), False)]}


def _inputs(B, C, T, H, W, kernel_t, with_cache, dtype):
    x = torch.randn(B, C, T, H, W, dtype=dtype)
    cache = torch.randn(B, C, kernel_t - 1, H, W, dtype=dtype) if with_cache else None
    return x, cache


def _grads(fn, x, cache, kernel_t, pad_hw, mode, gout, gnc):
    x = x.detach().clone().requires_grad_()
    cache = None if cache is None else cache.detach().clone().requires_grad_()
    out, nc = fn(x, kernel_t, cache, pad_hw, mode)
    (out * gout.to(out.dtype)).sum().add((nc * gnc.to(nc.dtype)).sum()).backward()
    return out.detach(), nc.detach(), x.grad, None if cache is None else cache.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["first", "zeros", "replicate"])
def test_parity(triton_kernels, mode, dtype):
    torch.manual_seed(0)
    for kernel_t, T, pad_hw, with_cache in MODE_CASES[mode]:
        x, cache = _inputs(2, 2, T, 5, 7, kernel_t, with_cache, dtype)
        B, C, _, H, W = x.shape
        # output grads representable in dtype: ours, plain and the fp64 reference see the same values
        gout = torch.randn(B, C, T + kernel_t - 1, H + 2 * pad_hw[0], W + 2 * pad_hw[1]).to(dtype).double()
        gnc = torch.randn(B, C, kernel_t - 1, H, W).to(dtype).double()
        out, nc, dx, dc = _grads(causal_pad3d, x, cache, kernel_t, pad_hw, mode, gout, gnc)
        ref = _grads(causal_pad3d_ref, x.double(), None if cache is None else cache.double(), kernel_t, pad_hw,
                     mode, gout, gnc)
        plain = _grads(causal_pad3d_ref, x, cache, kernel_t, pad_hw, mode, gout, gnc)
        # the forward is a copy: bit-exact in every dtype
        assert torch.equal(out, plain[0]) and torch.equal(nc, plain[1])
        assert_parity(dx, ref[2], plain[2], atol=1e-6, name=f"dx {mode} {kernel_t} {T} {pad_hw}")
        if with_cache:
            assert_parity(dc, ref[3], plain[3], atol=1e-6, name=f"dcache {mode} {kernel_t} {T} {pad_hw}")


@pytest.mark.parametrize("mode", ["first", "zeros", "replicate"])
def test_reference_backward_matches_autograd(torch_kernels, mode):
    """The op's pure-torch backward (used on CPU) is the written-out gradient of causal_pad3d_ref."""
    torch.manual_seed(3)
    for kernel_t, T, pad_hw, with_cache in CASES:
        with_cache = with_cache and mode != "replicate"
        x, cache = _inputs(2, 3, T, 5, 4, kernel_t, with_cache, torch.float64)
        gout = torch.randn(2, 3, T + kernel_t - 1, 5 + 2 * pad_hw[0], 4 + 2 * pad_hw[1], dtype=torch.float64)
        gnc = torch.randn(2, 3, kernel_t - 1, 5, 4, dtype=torch.float64)
        got = _grads(causal_pad3d, x.float(), None if cache is None else cache.float(), kernel_t, pad_hw, mode,
                     gout, gnc)
        ref = _grads(causal_pad3d_ref, x, cache, kernel_t, pad_hw, mode, gout, gnc)
        for a, b in zip(got[2:], ref[2:]):
            if b is not None:
                torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-6)


def test_strided_inputs_and_stride0_grads(triton_kernels):
    torch.manual_seed(1)
    big = torch.randn(2, 5, 6, 9, 11)
    x = big[:, 1:4, 2:5, 1:7, 2:9]                    # a view: strides of the big tensor, last stride 1
    cache = torch.randn(2, 3, 9, 6, 11)[:, :, 3:5, :, 1:8]
    expanded = torch.randn(2, 1, 3, 6, 7).expand(2, 3, 3, 6, 7)   # stride 0 along C
    transposed = torch.randn(2, 3, 3, 7, 6).transpose(3, 4)       # last stride != 1: copied by the launcher
    for xi, ci in ((x, cache), (expanded, None), (transposed, cache)):
        out, nc = causal_pad3d(xi, 3, ci, (1, 2))
        ref_out, ref_nc = causal_pad3d_ref(xi, 3, ci, (1, 2))
        assert torch.equal(out, ref_out) and torch.equal(nc, ref_nc)
    # .sum().backward() hands the op stride-0 gradients
    xg = x.detach().requires_grad_()
    cg = cache.detach().requires_grad_()
    out, nc = causal_pad3d(xg, 3, cg, (1, 2))
    (out.sum() + nc.sum()).backward()
    xr = x.detach().requires_grad_()
    cr = cache.detach().requires_grad_()
    ro, rn = causal_pad3d_ref(xr, 3, cr, (1, 2))
    (ro.sum() + rn.sum()).backward()
    assert torch.equal(xg.grad, xr.grad) and torch.equal(cg.grad, cr.grad)


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Every floating tensor the launchers allocate (new_empty, empty_like) starts as NaN, so an output element a
    kernel never writes shows up (conftest's poison_like, applied inside the launchers)."""
    new_empty, empty_like = torch.Tensor.new_empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: poison(new_empty(self, *a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


@pytest.mark.parametrize("mode", ["first", "zeros", "replicate"])
def test_every_output_element_written(triton_kernels, poisoned_allocations, mode):
    torch.manual_seed(6)
    with_cache = mode != "replicate"
    x, cache = _inputs(1, 2, 2, 5, 6, 4, with_cache, torch.float32)
    gout, gnc = torch.randn(1, 2, 5, 9, 8).double(), torch.randn(1, 2, 3, 5, 6).double()
    got = _grads(causal_pad3d, x, cache, 4, (2, 1), mode, gout, gnc)
    ref = _grads(causal_pad3d_ref, x, cache, 4, (2, 1), mode, gout, gnc)
    for a, b in zip(got, ref):
        if b is not None:
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", ["triton", "torch"])
def test_replicate_with_an_empty_frame(monkeypatch, path):
    """H = 0 in mode "replicate" (nothing to pad along H): both paths return the empty results and gradients
    (the pure-torch path crashed in F.pad(mode="replicate"))."""
    monkeypatch.setenv("COGVIDEOX_KERNELS", path)
    x = torch.randn(1, 2, 3, 0, 5, requires_grad=True)
    out, nc = causal_pad3d(x, 3, None, (0, 1), "replicate")
    assert out.shape == (1, 2, 5, 0, 7) and nc.shape == (1, 2, 2, 0, 5)
    (dx,) = torch.autograd.grad(out.sum() + nc.sum(), x)
    assert dx.shape == x.shape


def test_grad_from_out_only(triton_kernels):
    """new_cache unused: autograd passes no gradient for it."""
    x = torch.randn(1, 2, 2, 4, 5, requires_grad=True)
    out, _ = causal_pad3d(x, 3, None, (1, 1))
    g = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, g)
    xr = x.detach().requires_grad_()
    (ref,) = torch.autograd.grad(causal_pad3d_ref(xr, 3, None, (1, 1))[0], xr, g)
    torch.testing.assert_close(dx, ref, rtol=1e-6, atol=1e-6)


def test_backward_deterministic(triton_kernels):
    torch.manual_seed(2)
    x = torch.randn(1, 3, 2, 6, 5, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(1, 3, 4, 8, 9, dtype=torch.bfloat16)
    grads = []
    for _ in range(2):
        out, _ = causal_pad3d(x, 3, None, (1, 2), "replicate")
        grads.append(torch.autograd.grad(out, x, g)[0])
    assert torch.equal(grads[0], grads[1])


@pytest.mark.skipif(TEST_DEVICE != "cpu", reason="checks the CPU dispatch; COGVIDEOX_TEST_DEVICE puts tensors on a GPU")
def test_default_cpu_path_is_reference(monkeypatch):
    monkeypatch.delenv("COGVIDEOX_KERNELS", raising=False)
    x, cache = torch.randn(1, 2, 3, 4, 5), torch.randn(1, 2, 2, 4, 5)
    for a, b in zip(causal_pad3d(x, 3, cache, (1, 1)), causal_pad3d_ref(x, 3, cache, (1, 1))):
        assert torch.equal(a, b)


@pytest.mark.parametrize("use_triton", [False, True])
def test_opcheck(monkeypatch, use_triton):
    monkeypatch.setenv("COGVIDEOX_KERNELS", "triton" if use_triton else "torch")
    x = torch.randn(1, 2, 2, 3, 4, requires_grad=True)
    cache = torch.randn(1, 2, 2, 3, 4, requires_grad=True)
    torch.library.opcheck(cp._causal_pad3d_op, (x, 3, cache, 1, 1, "first"))
    torch.library.opcheck(cp._causal_pad3d_op, (x, 2, None, 0, 2, "replicate"))
    dout, dnc = torch.randn(1, 2, 4, 5, 6), torch.randn(1, 2, 2, 3, 4)
    torch.library.opcheck(cp._causal_pad3d_bwd_op, (dout, dnc, 2, 3, 1, 1, "first", True))
    torch.library.opcheck(cp._causal_pad3d_bwd_op, (dout, None, 2, 3, 1, 1, "zeros", False))


def test_compile_no_graph_breaks(triton_kernels):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    counter = torch._dynamo.testing.CompileCounter()   # counts the graphs Dynamo hands over, runs them eagerly

    def f(x, cache):
        out, nc = causal_pad3d(x, 3, cache, (1, 1))
        return out.float().square().sum() + nc.sum()

    cf = torch.compile(f, backend=counter, fullgraph=True)
    for T in (2, 3, 5):
        x = torch.randn(1, 2, T, 4, 3, requires_grad=True)
        cache = torch.randn(1, 2, 2, 4, 3, requires_grad=True)
        loss = cf(x, cache)
        loss.backward()
        xr, cr = x.detach().requires_grad_(), cache.detach().requires_grad_()
        f(xr, cr).backward()
        torch.testing.assert_close(x.grad, xr.grad)
        torch.testing.assert_close(cache.grad, cr.grad)
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
    assert counter.frame_count <= 2


# the VAE's causal convs: encoder full resolution (first chunk 9 frames), the middle resolutions, decoder 60 x 90
VAE_SHAPES = [(1, 128, 9, 480, 720), (1, 256, 5, 240, 360), (1, 512, 3, 120, 180), (1, 512, 3, 60, 90)]
# whole 49-frame videos, the largest activations (CogVideoX 1.0 at 480 x 720, 1.5 at 768 x 1360): launch sizes only
WHOLE_VIDEOS = [(1, 128, 49, 480, 720), (1, 128, 49, 768, 1360)]
def _addptr_offsets(ttir, ptr):
    return re.findall(rf"tt\.addptr %{ptr}, %\S+ : !tt\.ptr<\w+>, (i\d+)", ttir)


def test_vae_grid_fits():
    for B, C, T, H, W in VAE_SHAPES + WHOLE_VIDEOS:
        block_h, block_w, _ = cp._tile(H + 2, W + 2)
        _, grid = cp._grid(B * C * (T + 2), H + 2, W + 2, block_h, block_w)
        assert grid[0] < 2**31 and grid[1] <= 65535
        assert cp.flat_launch(B * C * (T + 2), H * W)[3][0] < 2**31      # no spatial pad: the flat kernels


@pytest.mark.parametrize("call, exc, match", [
    (lambda x: causal_pad3d(x.cpu().numpy(), 3), TypeError, "torch.Tensor"),
    (lambda x: causal_pad3d(x.to(torch.int32), 3), TypeError, "dtype"),
    (lambda x: causal_pad3d(x[0], 3), ValueError, "5-D"),
    (lambda x: causal_pad3d(x[:, :, :0], 3), ValueError, "at least one frame"),
    (lambda x: causal_pad3d(x, 0), ValueError, "kernel_t"),
    (lambda x: causal_pad3d(x, True), ValueError, "kernel_t"),
    (lambda x: causal_pad3d(x, 3, mode="reflect"), ValueError, "mode"),
    (lambda x: causal_pad3d(x, 3, pad_hw=(1, -1)), ValueError, "pad_hw"),
    (lambda x: causal_pad3d(x, 3, pad_hw=(1,)), ValueError, "pad_hw"),
    (lambda x: causal_pad3d(x, 3, pad_hw=1), ValueError, "pad_hw"),
    (lambda x: causal_pad3d(x, 3, torch.randn(1, 2, 2, 4, 5), mode="replicate"), ValueError, "no cache"),
    (lambda x: causal_pad3d(x, 3, torch.randn(1, 2, 1, 4, 5)), ValueError, "cache must have shape"),
    (lambda x: causal_pad3d(x, 3, torch.randn(1, 2, 2, 4, 5, dtype=torch.bfloat16)), TypeError, "dtype"),
    (lambda x: causal_pad3d(x, 3, torch.randn(1, 2, 2, 4, 5, device="meta")), ValueError, "device"),
    (lambda x: causal_pad3d(x, 3, torch.randn(1, 2, 2, 4, 5).tolist()), TypeError, "torch.Tensor"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call(torch.randn(1, 2, 3, 4, 5))
