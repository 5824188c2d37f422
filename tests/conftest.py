"""Shared test helpers. TRITON_INTERPRET must be set before triton is imported, so it is set here first.

COGVIDEOX_TEST_DEVICE=cuda (scripts/gpu_check.sh) runs the same tests on a GPU with the real Triton compiler: no
interpreter, and tensors created without a device land on CUDA (torch.set_default_device), where the ops take
the Triton path."""
import os

TEST_DEVICE = os.environ.get("COGVIDEOX_TEST_DEVICE", "cpu")
if TEST_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if TEST_DEVICE != "cpu":
    torch.set_default_device(TEST_DEVICE)


@pytest.fixture
def triton_kernels(monkeypatch):
    """Force the Triton kernels (in the interpreter on CPU) for the duration of a test."""
    monkeypatch.setenv("COGVIDEOX_KERNELS", "triton")
    if TEST_DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def torch_kernels(monkeypatch):
    """Force the pure-torch references."""
    monkeypatch.setenv("COGVIDEOX_KERNELS", "torch")


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_parity(ours: torch.Tensor, ref: torch.Tensor, plain: torch.Tensor | None = None,
                  atol: float = 1e-6, rtol: float = 1e-5, name: str = "output") -> None:
    """The house parity rule (../shared/CONVENTIONS.md).

    ref is computed in fp32/fp64. For fp32 outputs: max |ours - ref| <= rtol * max|ref| + atol. For low-precision
    outputs, `plain` is plain PyTorch run in the same low precision: max |ours - ref| <= 2 * max |plain - ref| + atol.
    """
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    if ours.numel() == 0:
        return
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err = max_err(ours, ref)
    if ours.dtype in (torch.float32, torch.float64) or plain is None:
        bound = rtol * ref.double().abs().max().item() + atol
        assert err <= bound, f"{name}: max err {err:.3e} > {bound:.3e} (rtol {rtol}, atol {atol})"
    else:
        plain_err = max_err(plain, ref)
        bound = 2 * plain_err + atol
        assert err <= bound, f"{name}: max err {err:.3e} > 2 x plain {ours.dtype} err {plain_err:.3e} + {atol}"


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor of NaNs shaped like t: pass as an output buffer to catch elements a kernel never writes."""
    return torch.full_like(t, float("nan"))
