"""group_norm_silu_pad: Triton kernels (interpreter, or CUDA under COGVIDEOX_TEST_DEVICE) vs the reference;
registration, compile, errors. The compiled-code properties are in test_inspect.py."""
import sys

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F

import kernels.group_norm_silu_pad  # noqa: F401  (the package re-exports the function under the same name)
from kernels import _static
from conftest import TEST_DEVICE, assert_parity
from kernels.causal_pad3d import causal_pad3d_ref
from test_causal_pad3d import WHOLE_VIDEOS, poisoned_allocations  # noqa: F401 (a fixture)

gn = sys.modules["kernels.group_norm_silu_pad"]
group_norm_silu_pad, group_norm_silu_pad_ref = gn.group_norm_silu_pad, gn.group_norm_silu_pad_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (shape, num_groups, kernel_t, pad_hw, with_cache, spatial_norm, silu, affine)
CASES = [
    ((2, 6, 1, 5, 7), 3, 3, (1, 1), False, True, True, True),      # decoder, first chunk of one latent frame
    ((1, 4, 3, 4, 6), 2, 3, (1, 1), True, True, True, True),       # decoder, a cached chunk
    ((2, 6, 2, 3, 9), 2, 3, (1, 1), False, False, True, True),     # encoder resnet, first chunk
    ((1, 4, 2, 5, 3), 4, 1, (0, 0), False, False, False, False),   # k1, plain GroupNorm without affine
    ((1, 6, 1, 3, 5), 3, 4, (2, 1), True, False, True, True),      # T < kernel_t - 1: the cache feeds new_cache
    ((1, 4, 3, 4, 6), 2, 3, (0, 0), True, True, True, True),       # as the VAE calls it: the conv pads H and W
    ((2, 6, 2, 3, 8), 3, 3, (0, 0), False, False, True, True),     # ... a first chunk (flat kernels, 16-byte rows)
    ((1, 6, 1, 3, 5), 3, 4, (0, 0), True, True, True, True),       # ... T < kernel_t - 1, the cache feeds new_cache
    ((2, 4, 1, 2, 4), 2, 4, (0, 0), False, True, True, True),      # ... frame 0 in every front and new_cache frame
]


@pytest.fixture(params=["single", "split"])
def gn_path(request, monkeypatch):
    """The kernels a flat (pad 0) chunk takes: "single" (one program per (b, group) chunk, as every CASES chunk
    fits FUSED_MAX) or "split" (statistics + apply, two backward passes: FUSED_MAX = 0). Padded cases always
    split."""
    if request.param == "split":
        monkeypatch.setattr(gn, "FUSED_MAX", 0)
    return request.param


def _inputs(shape, kernel_t, with_cache, spatial_norm, affine, dtype):
    B, C, T, H, W = shape
    x = torch.randn(shape) * 1.5 + 0.5
    t = {"x": x, "weight": 1 + 0.3 * torch.randn(C) if affine else None, "bias": torch.randn(C) if affine else None,
         "cache": torch.randn(B, C, kernel_t - 1, H, W) if with_cache else None,
         "zq_scale": 1 + 0.5 * torch.randn(shape) if spatial_norm else None,
         "zq_shift": torch.randn(shape) if spatial_norm else None}
    return {k: None if v is None else v.to(dtype) for k, v in t.items()}


def _plain(x, num_groups, weight=None, bias=None, eps=1e-6, kernel_t=3, cache=None, pad_hw=(1, 1), zq_scale=None,
           zq_shift=None, silu=True):
    """What diffusers does, op by op in x's dtype."""
    h = F.group_norm(x, num_groups, weight, bias, eps)
    if zq_scale is not None:
        h = h * zq_scale + zq_shift
    if silu:
        h = F.silu(h)
    return causal_pad3d_ref(h, kernel_t, cache, pad_hw, "first")


NAMES = ["x", "weight", "bias", "cache", "zq_scale", "zq_shift"]


def _run(fn, t, num_groups, kernel_t, pad_hw, silu, gout, gnc, dtype=None):
    """Forward + backward of fn on copies of the tensors t (cast to dtype): (out, new_cache, {name: grad})."""
    leaves = {k: None if v is None else (v.to(dtype) if dtype else v).detach().clone().requires_grad_()
              for k, v in t.items()}
    out, nc = fn(leaves["x"], num_groups, leaves["weight"], leaves["bias"], 1e-6, kernel_t, leaves["cache"], pad_hw,
                 leaves["zq_scale"], leaves["zq_shift"], silu)
    loss = (out * gout.to(out.dtype)).sum()
    if gnc is not None:
        loss = loss + (nc * gnc.to(nc.dtype)).sum()
    loss.backward()
    return out.detach(), nc.detach(), {k: v.grad for k, v in leaves.items() if v is not None}


def _grad_outputs(shape, kernel_t, pad_hw, dtype=torch.float32):
    """Output grads with values representable in dtype, so that ours, plain and the fp64 reference see the same."""
    B, C, T, H, W = shape
    gout = torch.randn(B, C, T + kernel_t - 1, H + 2 * pad_hw[0], W + 2 * pad_hw[1]).to(dtype).double()
    return gout, torch.randn(B, C, kernel_t - 1, H, W).to(dtype).double()


@pytest.mark.parametrize("dtype", DTYPES)
def test_parity(triton_kernels, gn_path, dtype):
    torch.manual_seed(0)
    for shape, G, kernel_t, pad_hw, with_cache, spatial_norm, silu, affine in CASES:
        if gn_path == "single" and pad_hw != (0, 0):
            continue                                       # the padded kernels: run under "split"
        t = _inputs(shape, kernel_t, with_cache, spatial_norm, affine, dtype)
        gout, gnc = _grad_outputs(shape, kernel_t, pad_hw, dtype)
        out, nc, grads = _run(group_norm_silu_pad, t, G, kernel_t, pad_hw, silu, gout, gnc)
        ref_out, ref_nc, ref_grads = _run(group_norm_silu_pad_ref, t, G, kernel_t, pad_hw, silu, gout, gnc,
                                          dtype=torch.float64)
        plain_out, plain_nc, plain_grads = _run(_plain, t, G, kernel_t, pad_hw, silu, gout, gnc)
        case = f"{shape} G={G} k={kernel_t} cache={with_cache} zq={spatial_norm} silu={silu}"
        assert_parity(out, ref_out, plain_out, atol=1e-5, name=f"out {case}")
        if kernel_t > 1:   # conftest's assert_parity cannot take the empty cache of kernel_t = 1
            assert_parity(nc, ref_nc, plain_nc, atol=1e-5, name=f"new_cache {case}")
        assert nc.shape == ref_nc.shape
        assert set(grads) == set(ref_grads)
        for k in grads:
            assert grads[k].dtype == t[k].dtype
            assert_parity(grads[k], ref_grads[k], plain_grads[k], atol=1e-5, name=f"d{k} {case}")


def test_reference_backward_matches_autograd(torch_kernels):
    """The op's written-out pure-torch backward (the CPU path) against autograd through the fp64 reference."""
    torch.manual_seed(1)
    for shape, G, kernel_t, pad_hw, with_cache, spatial_norm, silu, affine in CASES:
        t = _inputs(shape, kernel_t, with_cache, spatial_norm, affine, torch.float32)
        gout, gnc = _grad_outputs(shape, kernel_t, pad_hw)
        out, nc, grads = _run(group_norm_silu_pad, t, G, kernel_t, pad_hw, silu, gout, gnc)
        _, _, ref = _run(group_norm_silu_pad_ref, t, G, kernel_t, pad_hw, silu, gout, gnc, dtype=torch.float64)
        for k in grads:
            assert_parity(grads[k], ref[k], rtol=2e-5, atol=1e-5, name=f"d{k}")


@pytest.mark.parametrize("pad_hw", [(2, 1), (0, 0)])
def test_every_output_element_written(triton_kernels, gn_path, poisoned_allocations, pad_hw):
    torch.manual_seed(8)
    for with_cache, spatial_norm in ((False, True), (True, False)):
        t = _inputs((1, 4, 2, 5, 3), 4, with_cache, spatial_norm, True, torch.float32)
        gout, gnc = _grad_outputs((1, 4, 2, 5, 3), 4, pad_hw)
        out, nc, grads = _run(group_norm_silu_pad, t, 2, 4, pad_hw, True, gout, gnc)
        ref_out, ref_nc, ref = _run(group_norm_silu_pad_ref, t, 2, 4, pad_hw, True, gout, gnc, dtype=torch.float64)
        assert_parity(out, ref_out, name="out")
        assert_parity(nc, ref_nc, name="new_cache")
        for k in ref:
            assert_parity(grads[k], ref[k], atol=1e-5, name=f"d{k}")


def test_chunked_decode(triton_kernels):
    """Chunk 1 (one frame, replicate-first) hands its new_cache to chunk 2, as the VAE's causal convs do."""
    torch.manual_seed(7)
    t = _inputs((1, 4, 4, 3, 5), 3, False, True, True, torch.bfloat16)
    chunks = [slice(0, 1), slice(1, 4)]
    cache = ref_cache = None
    for sl in chunks:
        args = (t["x"][:, :, sl], 2, t["weight"], t["bias"], 1e-6, 3)
        kw = dict(zq_scale=t["zq_scale"][:, :, sl], zq_shift=t["zq_shift"][:, :, sl])
        out, cache = group_norm_silu_pad(*args, cache=cache, **kw)
        ref_out, ref_cache = group_norm_silu_pad_ref(*args, cache=ref_cache, **kw)
        # both round once from fp32; at most one bf16 ulp apart where fp32 summation orders differ
        torch.testing.assert_close(out, ref_out, rtol=8e-3, atol=8e-3)
        torch.testing.assert_close(cache, ref_cache, rtol=8e-3, atol=8e-3)


def test_statistics_far_from_zero(triton_kernels):
    """Shifted sums merged by Chan's formula: a mean of 3000 and a std of 1 over several programs per frame keeps
    rstd exact to fp32 level (E[x^2] - E[x]^2 in fp32 would lose every digit)."""
    torch.manual_seed(2)
    x = 3000 + torch.randn(1, 4, 2, 96, 181)          # 17,376 elements a frame: 2 programs of up to 8 x 2048
    assert gn._chunking(96 * 181)[2] == 2
    _, _, stats, rstd = gn._group_norm_silu_pad_op(x, 2, None, None, 1e-6, 1, None, 0, 0, None, None, False)
    var, ref_mean = torch.var_mean(x.double().reshape(1, 2, -1), dim=-1, unbiased=False)
    torch.testing.assert_close(stats[..., 0].double() + stats[..., 1].double(), ref_mean, rtol=1e-7, atol=0)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(var + 1e-6), rtol=2e-5, atol=0)


@pytest.mark.parametrize("path", ["triton", "torch"])
@pytest.mark.parametrize("pad_hw", [(0, 0), (1, 1)])
def test_constant_and_near_constant_groups(monkeypatch, path, pad_hw):
    """A group whose values are all equal normalizes to exactly 0 (out = bias), as torch's GroupNorm gives (the
    first fix gave 0.70: the mean rounded to fp32 away from the value); near-constant data (12345.678 + 1e-3
    noise, fp32) errs no more than twice torch's fp32 GroupNorm against fp64."""
    monkeypatch.setenv("COGVIDEOX_KERNELS", path)
    torch.manual_seed(11)
    w, b = 1 + 0.3 * torch.randn(4), torch.randn(4)
    x = torch.full((1, 4, 2, 3, 8), 12345.678)
    x[:, 2:] = -0.37                                                  # the other group: another constant
    out, _ = group_norm_silu_pad(x, 2, w, b, 1e-6, 1, None, pad_hw, silu=False)
    ph, pw = pad_hw
    interior = out[..., ph:ph + 3, pw:pw + 8]
    assert torch.equal(interior, b.reshape(1, 4, 1, 1, 1).expand_as(interior))
    x = 12345.678 + 1e-3 * torch.randn(1, 4, 2, 3, 8)
    out, _ = group_norm_silu_pad(x, 2, w, b, 1e-6, 1, None, pad_hw, silu=False)
    ref = F.group_norm(x.double(), 2, w.double(), b.double(), 1e-6)
    plain = F.group_norm(x, 2, w, b, 1e-6)
    assert_parity(out[..., ph:ph + 3, pw:pw + 8], ref, plain, atol=1e-5, name="near-constant")
    assert_parity(out[..., ph:ph + 3, pw:pw + 8], ref, atol=1e-3, rtol=0, name="near-constant, absolute")


def test_strided_inputs_and_stride0_grads(triton_kernels):
    torch.manual_seed(3)
    B, C, T, H, W = 1, 4, 2, 4, 6
    x = torch.randn(B, C + 2, T + 1, H + 1, W + 3)[:, 1:5, 1:, :H, 2:8]          # views, last stride 1
    zs = torch.randn(B, C, T, W, H).transpose(3, 4)                              # last stride != 1: copied
    zb = torch.randn(1, 1, T, H, W).expand(B, C, T, H, W)                        # stride 0 along C
    cache = torch.randn(B, C, 5, H, W)[:, :, 1:3]
    weight, bias = torch.randn(2 * C)[::2], torch.randn(C)                       # a strided weight
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias, cache, zs)]
    out, nc = group_norm_silu_pad(leaves[0], 2, leaves[1], leaves[2], 1e-6, 3, leaves[3], (1, 1), leaves[4], zb)
    (out.sum() + nc.sum()).backward()                                            # stride-0 output grads
    refs = [t.detach().double().requires_grad_() for t in (x, weight, bias, cache, zs)]
    ro, rn = group_norm_silu_pad_ref(refs[0], 2, refs[1], refs[2], 1e-6, 3, refs[3], (1, 1), refs[4], zb.double())
    (ro.sum() + rn.sum()).backward()
    assert_parity(out, ro, name="out")
    assert_parity(nc, rn, name="new_cache")
    for ours, ref, name in zip(leaves, refs, NAMES):
        assert_parity(ours.grad, ref.grad, atol=1e-5, name=f"d{name}")


def test_flat_strided_views(triton_kernels, gn_path):
    """Contiguous frames inside strided channels and frames (views of a larger tensor, a stride-0 zq_shift, a
    slice of a longer cache) take the flat kernels, single-program or split: strides, not shapes, address them."""
    torch.manual_seed(13)
    B, C, T, H, W = 2, 4, 2, 3, 8
    x = torch.randn(B, C + 2, T + 1, H, W)[:, 1:5, 1:]
    zs = torch.randn(B, C, 2 * T, H, W)[:, :, ::2]
    zb = torch.randn(1, 1, T, H, W).expand(B, C, T, H, W)                        # stride 0 along B and C
    cache = torch.randn(B, C, 5, H, W)[:, :, 1:3]
    weight, bias = 1 + 0.3 * torch.randn(C), torch.randn(C)
    assert _launches(gn.group_norm_silu_pad_fwd, x, 2, weight, bias, 1e-6, 3, cache, 0, 0, zs, zb, True) == \
        (["_gn_fused_fwd_kernel"] if gn_path == "single" else ["_gn_stats_kernel", "_gn_apply_flat_kernel"])
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias, cache, zs)]
    out, nc = group_norm_silu_pad(leaves[0], 2, leaves[1], leaves[2], 1e-6, 3, leaves[3], (0, 0), leaves[4], zb)
    gout, gnc = torch.randn_like(out), torch.randn_like(nc)
    ((out * gout).sum() + (nc * gnc).sum()).backward()
    refs = [t.detach().double().requires_grad_() for t in (x, weight, bias, cache, zs)]
    ro, rn = group_norm_silu_pad_ref(refs[0], 2, refs[1], refs[2], 1e-6, 3, refs[3], (0, 0), refs[4], zb.double())
    ((ro * gout.double()).sum() + (rn * gnc.double()).sum()).backward()
    assert_parity(out, ro, name="out")
    assert_parity(nc, rn, name="new_cache")
    for ours, ref, name in zip(leaves, refs, NAMES):
        assert_parity(ours.grad, ref.grad, atol=1e-5, name=f"d{name}")


def test_backward_takes_strided_statistics(triton_kernels):
    """The backward op's stats (B, G, 2) / rstd (B, G) are indexed as contiguous in the kernels: transposed views
    must give what the reference computes from them, not the statistics of another group."""
    torch.manual_seed(9)
    t = _inputs((2, 4, 2, 3, 4), 3, False, True, True, torch.float32)
    mean = torch.randn(2, 2, 2).transpose(0, 1)                            # (B, G, 2), not contiguous
    rstd = (torch.rand(2, 2) + 0.5).t()                                    # (B, G) = (2, 2), strides (1, 2)
    assert not mean.is_contiguous()
    dout, dnc = torch.randn(2, 4, 4, 5, 6), torch.randn(2, 4, 2, 3, 4)
    args = (dout, dnc, t["x"], t["weight"], t["bias"], t["zq_scale"], t["zq_shift"], mean, rstd, 2, 3, False, 1, 1,
            True)
    names = ("x", "weight", "bias", "zq_scale", "zq_shift", "cache")
    for ours, ref, name in zip(gn.group_norm_silu_pad_bwd(*args), gn.group_norm_silu_pad_bwd_ref(*args), names):
        assert_parity(ours, ref, atol=1e-5, name=f"d{name}")


def test_backward_deterministic_and_out_only(triton_kernels):
    """Two backward passes agree bit for bit; a loss on `out` alone (no new_cache grad) is also correct."""
    torch.manual_seed(4)
    t = _inputs((1, 4, 2, 5, 6), 3, False, True, True, torch.bfloat16)
    gout, _ = _grad_outputs((1, 4, 2, 5, 6), 3, (1, 1), torch.bfloat16)
    runs = [_run(group_norm_silu_pad, t, 2, 3, (1, 1), True, gout, None)[2] for _ in range(2)]
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k
    _, _, ref = _run(group_norm_silu_pad_ref, t, 2, 3, (1, 1), True, gout, None, dtype=torch.float64)
    _, _, plain = _run(_plain, t, 2, 3, (1, 1), True, gout, None)
    for k in ref:
        assert_parity(runs[0][k], ref[k], plain[k], atol=1e-5, name=f"d{k}")


def _launches(launcher, *args):
    """The kernel names a launcher would launch for these arguments (kernels._static records, nothing runs)."""
    return [launch.name for launch in _static.record(launcher, *args)]


# (shape, num_groups): a (b, group) chunk of exactly FUSED_MAX elements (4 channels x 2 frames x 32 x 32) and
# one element past it (1025 elements a frame round up to 2048)
AT_THRESHOLD, PAST_THRESHOLD = ((1, 8, 2, 32, 32), 2), ((1, 8, 2, 25, 41), 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [AT_THRESHOLD, PAST_THRESHOLD], ids=["at", "past"])
@pytest.mark.parametrize("with_cache", [False, True])
def test_single_program_threshold(triton_kernels, case, with_cache, dtype):
    """At FUSED_MAX the forward is one launch and the backward one pass (dcache included); one element past it,
    statistics + apply and two backward passes. Both match the reference forward and backward, and two
    backward runs agree bit for bit."""
    shape, G = case
    B, C, T, H, W = shape
    fits = case is AT_THRESHOLD
    assert (gn.fused_blocks(C // G, T, 2, H * W) is not None) == fits
    t = _inputs(shape, 3, with_cache, True, True, dtype)
    meta = {k: None if v is None else v.to("meta") for k, v in t.items()}
    fwd = _launches(gn.group_norm_silu_pad_fwd, meta["x"], G, meta["weight"], meta["bias"], 1e-6, 3, meta["cache"],
                    0, 0, meta["zq_scale"], meta["zq_shift"], True)
    stats = torch.empty(B, G, 2, device="meta")
    bwd = _launches(gn.group_norm_silu_pad_bwd, torch.empty(B, C, T + 2, H, W, device="meta", dtype=dtype),
                    torch.empty(B, C, 2, H, W, device="meta", dtype=dtype), meta["x"], meta["weight"], meta["bias"],
                    meta["zq_scale"], meta["zq_shift"], stats, stats[..., 0], G, 3, with_cache, 0, 0, True)
    if fits:
        assert fwd == ["_gn_fused_fwd_kernel"] and bwd == ["_gn_fused_bwd_kernel"]
    else:
        assert fwd == ["_gn_stats_kernel", "_gn_apply_flat_kernel"]
        assert bwd == ["_causal_pad3d_flat_bwd_kernel"] * with_cache + ["_gn_bwd_kernel"] * 2
    torch.manual_seed(12)
    gout, gnc = _grad_outputs(shape, 3, (0, 0), dtype)
    runs = [_run(group_norm_silu_pad, t, G, 3, (0, 0), True, gout, gnc) for _ in range(2)]
    for k in runs[0][2]:
        assert torch.equal(runs[0][2][k], runs[1][2][k]), k
    out, nc, grads = runs[0]
    ref_out, ref_nc, ref = _run(group_norm_silu_pad_ref, t, G, 3, (0, 0), True, gout, gnc, dtype=torch.float64)
    plain_out, plain_nc, plain = _run(_plain, t, G, 3, (0, 0), True, gout, gnc)
    assert_parity(out, ref_out, plain_out, atol=1e-5, name="out")
    assert_parity(nc, ref_nc, plain_nc, atol=1e-5, name="new_cache")
    for k in ref:
        assert_parity(grads[k], ref[k], plain[k], atol=1e-5, name=f"d{k}")


@pytest.mark.skipif(TEST_DEVICE != "cpu", reason="checks the CPU dispatch; COGVIDEOX_TEST_DEVICE puts tensors on a GPU")
def test_default_cpu_path_is_reference(monkeypatch):
    monkeypatch.delenv("COGVIDEOX_KERNELS", raising=False)
    t = _inputs((1, 4, 2, 3, 5), 3, True, True, True, torch.float32)
    ours = group_norm_silu_pad(t["x"], 2, t["weight"], t["bias"], 1e-6, 3, t["cache"], (1, 1), t["zq_scale"],
                               t["zq_shift"])
    ref = group_norm_silu_pad_ref(t["x"], 2, t["weight"], t["bias"], 1e-6, 3, t["cache"], (1, 1), t["zq_scale"],
                                  t["zq_shift"])
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("use_triton", [False, True])
def test_opcheck(monkeypatch, use_triton):
    monkeypatch.setenv("COGVIDEOX_KERNELS", "triton" if use_triton else "torch")
    torch.manual_seed(5)
    t = {k: None if v is None else v.requires_grad_() for k, v in
         _inputs((1, 4, 2, 3, 4), 3, True, True, True, torch.float32).items()}
    torch.library.opcheck(gn._group_norm_silu_pad_op, (t["x"], 2, t["weight"], t["bias"], 1e-6, 3, t["cache"], 1, 1,
                                                       t["zq_scale"], t["zq_shift"], True))
    x = torch.randn(1, 4, 1, 3, 4, requires_grad=True)
    torch.library.opcheck(gn._group_norm_silu_pad_op, (x, 4, None, None, 1e-6, 3, None, 0, 1, None, None, False))
    mean, rstd = torch.randn(1, 2, 2), torch.rand(1, 2) + 0.5              # stats (B, G, 2), rstd (B, G)
    dout, dnc = torch.randn(1, 4, 4, 5, 6), torch.randn(1, 4, 2, 3, 4)
    torch.library.opcheck(gn._group_norm_silu_pad_bwd_op,
                          (dout, dnc, t["x"].detach(), t["weight"].detach(), t["bias"].detach(),
                           t["zq_scale"].detach(), t["zq_shift"].detach(), mean, rstd, 2, 3, True, 1, 1, True))
    torch.library.opcheck(gn._group_norm_silu_pad_bwd_op,
                          (dout, None, t["x"].detach(), None, None, None, None, mean, rstd, 2, 3, False, 1, 1, False))
    # no spatial pad: the single-program backward, which gathers dcache itself
    torch.library.opcheck(gn._group_norm_silu_pad_bwd_op,
                          (dout[..., 1:-1, 1:-1].contiguous(), dnc, t["x"].detach(), t["weight"].detach(),
                           t["bias"].detach(), t["zq_scale"].detach(), t["zq_shift"].detach(), mean, rstd, 2, 3, True,
                           0, 0, True))


def test_compile_no_graph_breaks(triton_kernels):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    counter = torch._dynamo.testing.CompileCounter()   # counts the graphs Dynamo hands over, runs them eagerly

    def f(x, weight, bias, cache, zq_scale, zq_shift):
        out, nc = group_norm_silu_pad(x, 2, weight, bias, 1e-6, 3, cache, (1, 1), zq_scale, zq_shift)
        return out.float().square().sum() + nc.sum()

    cf = torch.compile(f, backend=counter, fullgraph=True)
    torch.manual_seed(6)
    for T in (1, 2, 3):
        t = _inputs((1, 4, T, 3, 4), 3, True, True, True, torch.float32)
        leaves = [t[k].requires_grad_() for k in NAMES]
        cf(*leaves).backward()
        refs = [v.detach().clone().requires_grad_() for v in leaves]
        f(*refs).backward()
        for a, b, name in zip(leaves, refs, NAMES):
            torch.testing.assert_close(a.grad, b.grad, msg=name)
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
    assert counter.frame_count <= 2


# the CogVideoX VAE's norms (GroupNorm(32) before each k3 causal conv, pad 1): encoder at full resolution with a
# 9-frame first chunk, the lower encoder levels, the decoder's 60 x 90 latent-resolution mid block and its up levels
VAE_SHAPES = [(1, 128, 9, 480, 720), (1, 256, 5, 240, 360), (1, 512, 3, 120, 180), (1, 512, 3, 60, 90),
              (1, 256, 5, 240, 360), (1, 128, 8, 480, 720)]
def test_vae_launch_sizes():
    for B, C, T, H, W in VAE_SHAPES + WHOLE_VIDEOS:
        block, iters, n_chunks, _ = gn._chunking(H * W)
        assert block * iters * n_chunks >= H * W > block * iters * (n_chunks - 1)
        assert B * C * T * n_chunks < 2**31
    # one video with 32 groups fills an H100 (132 SMs): tens of thousands of statistics programs
    assert 128 * 9 * gn._chunking(480 * 720)[2] > 100 * 132


def _bad(**overrides):
    args = dict(x=torch.randn(1, 4, 2, 3, 5), num_groups=2, weight=None, bias=None, eps=1e-6, kernel_t=3, cache=None,
                pad_hw=(1, 1), zq_scale=None, zq_shift=None, silu=True)
    args.update(overrides)
    return lambda: group_norm_silu_pad(**args)


@pytest.mark.parametrize("call, exc, match", [
    (_bad(x=torch.randn(4, 2, 3, 5)), ValueError, "5-D"),
    (_bad(x=torch.randint(0, 3, (1, 4, 2, 3, 5))), TypeError, "dtype"),
    (_bad(num_groups=3), ValueError, "num_groups"),
    (_bad(num_groups=True), ValueError, "num_groups"),
    (_bad(weight=torch.randn(3)), ValueError, "weight must have shape"),
    (_bad(bias=torch.randn(4, 1)), ValueError, "bias must be 1-D"),
    (_bad(weight=torch.randn(4, device="meta")), ValueError, "device"),
    (_bad(zq_scale=torch.randn(1, 4, 2, 3, 5)), ValueError, "together"),
    (_bad(zq_scale=torch.randn(1, 4, 1, 3, 5), zq_shift=torch.randn(1, 4, 1, 3, 5)), ValueError, "zq_scale must"),
    (_bad(zq_scale=torch.randn(1, 4, 2, 3, 5).half(), zq_shift=torch.randn(1, 4, 2, 3, 5).half()), TypeError,
     "dtype"),
    (_bad(cache=torch.randn(1, 4, 1, 3, 5)), ValueError, "cache must have shape"),
    (_bad(kernel_t=0), ValueError, "kernel_t"),
    (_bad(pad_hw=(1, -1)), ValueError, "pad_hw"),
    (_bad(pad_hw=1), ValueError, "pad_hw"),
    (_bad(silu=1), TypeError, "silu"),
    (_bad(eps=0.0), ValueError, "eps"),
    (_bad(x=torch.randn(1, 4, 2, 0, 5)), ValueError, "empty"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
