"""attention(): every available backend against an fp64 reference, forced-backend errors, logging, torch.compile."""
import logging

import pytest
import torch

from cogvideox import attention as A
from tests.conftest import assert_parity

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _ref(q, k, v):
    """softmax(q k^T / sqrt(Dh)) v in fp64, (B, S, H, Dh) layout."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return (w @ v).transpose(1, 2)


def _plain(q, k, v):
    """The same math in the input dtype: plain PyTorch's error sets the parity bound for low precision."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    w = torch.softmax((qt @ kt.transpose(-1, -2)) * (q.shape[-1] ** -0.5), dim=-1)
    return (w @ vt).transpose(1, 2)


def _qkv(shape, dtype, seed=0, kv_len=None):
    g = torch.Generator().manual_seed(seed)
    B, S, H, D = shape
    q = torch.randn(B, S, H, D, generator=g).to(dtype)
    k, v = (torch.randn(B, kv_len or S, H, D, generator=g).to(dtype) for _ in range(2))
    return q, k, v


# CogVideoX-like: head dim 64, text 226 + vision tokens (scaled down); odd lengths; one token; a (B, H, S, D)
# tensor transposed into the (B, S, H, D) view the transformer produces.
SHAPES = [(2, 226 + 60, 3, 64), (1, 37, 2, 64), (1, 1, 1, 64), (3, 19, 5, 40)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_every_available_backend_matches_fp64(shape, dtype):
    q, k, v = _qkv(shape, dtype)
    names = A.available_backends(q)
    assert names and names[-2:] == ["sdpa", "sdpa-math"], names  # torch SDPA is always there
    ref = _ref(q, k, v)
    for name in names:
        out = A.attention(q, k, v, backend=name)
        assert out.dtype == dtype and out.shape == q.shape
        assert_parity(out, ref, _plain(q, k, v), atol=1e-6, rtol=1e-5, name=f"{name} {dtype}")


def test_non_contiguous_and_cross_length_inputs():
    q, k, v = _qkv((2, 23, 4, 64), torch.float32, seed=1, kv_len=31)
    # (B, H, S, D) storage seen as (B, S, H, D), as after a head split
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qt.is_contiguous()
    for name in A.available_backends(qt):
        assert_parity(A.attention(qt, kt, vt, backend=name), _ref(q, k, v), name=name)


def test_default_picks_first_available_and_logs_once(caplog):
    q, k, v = _qkv((1, 8, 2, 16), torch.float32, seed=2)
    A._CHOSEN.clear()
    with caplog.at_level(logging.INFO, logger="cogvideox.attention"):
        out1 = A.attention(q, k, v)
        out2 = A.attention(q, k, v)
    msgs = [r.getMessage() for r in caplog.records if r.name == "cogvideox.attention"]
    expected = A.available_backends(q)[0]
    assert len(msgs) == 1 and expected in msgs[0], msgs
    assert torch.equal(out1, out2)
    assert torch.equal(out1, A.attention(q, k, v, backend=expected))


def test_preference_covers_registry():
    assert sorted(A.PREFERENCE) == sorted(A.BACKENDS)


def test_forced_unavailable_backend_lists_reasons():
    q, k, v = _qkv((1, 8, 2, 16), torch.float32, seed=3)
    with pytest.raises(A.AttentionBackendError) as e:
        A.attention(q, k, v, backend="sdpa-cudnn")  # CUDA only (and fp16/bf16 only)
    msg = str(e.value)
    assert "sdpa-cudnn" in msg and "cpu" in msg
    for name in A.PREFERENCE:  # every candidate is listed with its verdict
        assert f"  {name}: " in msg
    assert "  sdpa: available" in msg
    if A._fa3_func is None:
        assert "flash-attn-3: package" in msg
    with pytest.raises(A.AttentionBackendError, match="unknown attention backend 'nope'"):
        A.attention(q, k, v, backend="nope")


def test_reasons_by_device_dtype_and_head_dim():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    needs_gpu = A.BACKENDS["sdpa-flash"].unavailable(cpu, torch.bfloat16, 64)
    assert needs_gpu and "CUDA" in needs_gpu
    # the checks below stop before querying the (absent) GPU's compute capability
    assert "dtype" in A.BACKENDS["sdpa-flash"].unavailable(cuda, torch.float32, 64)
    assert "head dim" in A.BACKENDS["sdpa-cudnn"].unavailable(cuda, torch.bfloat16, 256)
    assert "head dim" in A.BACKENDS["sdpa-efficient"].unavailable(cuda, torch.float32, 60)
    assert A.BACKENDS["sdpa"].unavailable(cpu, torch.bfloat16, 64) is None


def test_bad_inputs():
    q, k, v = _qkv((1, 8, 2, 16), torch.float32, seed=4)
    with pytest.raises(ValueError, match=r"\(B, S, H, Dh\)"):
        A.attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="do not match"):
        A.attention(q, k[..., :8], v[..., :8])
    with pytest.raises(TypeError, match="dtype"):
        A.attention(q, k.half(), v)


def test_compiles_fullgraph_without_graph_break():
    q, k, v = _qkv((2, 29, 2, 64), torch.float32, seed=5)
    torch._dynamo.reset()
    for backend in (None, "sdpa", "sdpa-math"):
        fn = torch.compile(lambda a, b, c, n=backend: A.attention(a, b, c, backend=n) * 2, fullgraph=True,
                           backend="eager")
        assert_parity(fn(q, k, v), _ref(q, k, v) * 2, name=str(backend))
    # the forced-unavailable error also surfaces under compile
    bad = torch.compile(lambda a, b, c: A.attention(a, b, c, backend="flash-attn-3"), fullgraph=True,
                        backend="eager")
    with pytest.raises(Exception, match="flash-attn-3"):
        bad(q, k, v)


def test_compiles_with_dynamic_shapes():
    """dynamic=True makes every dim symbolic, the head dim included: the choice must still be a constant."""
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b, c: A.attention(a, b, c), fullgraph=True, dynamic=True, backend="eager")
    for shape in [(2, 7, 2, 16), (1, 12, 3, 16), (2, 9, 2, 32)]:
        q, k, v = _qkv(shape, torch.float32, seed=shape[1])
        assert_parity(fn(q, k, v), _ref(q, k, v), name=str(shape))


def test_compiles_with_inductor():
    q, k, v = _qkv((1, 33, 2, 64), torch.float32, seed=6)
    torch._dynamo.reset()
    fn = torch.compile(A.attention, fullgraph=True)
    assert_parity(fn(q, k, v), _ref(q, k, v), name="inductor")


def test_torch_refusal_of_an_sdpa_sub_backend_is_a_reason(monkeypatch):
    """On CUDA the static limits cannot see torch's build or cuDNN version: torch's own can_use_* check is asked,
    so that backend=None never picks a sub-backend whose sdpa_kernel would fail with "No available kernel"."""
    # the real query: torch refuses its fused CUDA kernels for CPU tensors
    assert "can_use_flash_attention refuses" in A._torch_rejects("can_use_flash_attention", torch.device("cpu"),
                                                                 torch.bfloat16, 64)
    asked = []

    def fake_rejects(check, device, dtype, head_dim):
        asked.append(check)
        return "cuDNN too old" if check == "can_use_cudnn_attention" else None
    monkeypatch.setattr(A, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(A, "_torch_rejects", fake_rejects)
    monkeypatch.setattr(A, "_CHOSEN", {})
    cuda = torch.device("cuda", 0)
    reasons = A._reasons(cuda, torch.bfloat16, 64)
    assert reasons["sdpa-cudnn"] == "cuDNN too old"
    assert reasons["sdpa-flash"] is None and reasons["sdpa-efficient"] is None
    assert {"can_use_cudnn_attention", "can_use_flash_attention", "can_use_efficient_attention"} <= set(asked)
    expected = next(n for n in A.PREFERENCE if reasons[n] is None)
    assert expected != "sdpa-cudnn" and A._resolve(None, cuda, torch.bfloat16, 64) == expected
    with pytest.raises(A.AttentionBackendError, match="cuDNN too old"):
        A._resolve("sdpa-cudnn", cuda, torch.bfloat16, 64)
