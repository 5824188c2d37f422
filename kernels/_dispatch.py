"""What every op in `kernels` shares: which implementation runs, and the input checks.

Dispatch rule (one place, so every op behaves the same):
- CUDA tensors run the Triton kernels.
- CPU tensors run the pure-torch reference, unless the environment sets both `COGVIDEOX_KERNELS=triton` and
  `TRITON_INTERPRET=1` (the latter before triton is imported): then the Triton kernels run in the interpreter.
  That is how CI checks the real kernels without a GPU.
- `COGVIDEOX_KERNELS=torch` forces the reference everywhere (for debugging and for benchmarks of the baseline).
"""
from __future__ import annotations

import os
from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def use_triton(x: torch.Tensor) -> bool:
    """True when the op should launch its Triton kernels for tensors on x's device."""
    mode = os.environ.get("COGVIDEOX_KERNELS", "")
    if mode == "torch":
        return False
    if x.is_cuda:
        return True
    return mode == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


def check_tensor(name: str, t, ndim: int | None = None, dtypes: Iterable[torch.dtype] = FLOAT_DTYPES) -> None:
    """TypeError unless `t` is a tensor of one of `dtypes`; ValueError if its rank is not `ndim`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dtypes = tuple(dtypes)
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, dtype: bool = True) -> None:
    """`t` must sit on ref's device (ValueError) and, if `dtype`, share its dtype (TypeError)."""
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; all inputs must share a device")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match")


def check_shape(name: str, t: torch.Tensor, expected: tuple) -> None:
    """ValueError unless t.shape == expected (nothing is broadcast silently)."""
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def check_text_len(text_len, seq_len: int) -> int:
    if isinstance(text_len, bool) or not isinstance(text_len, int):
        raise TypeError(f"text_len must be an int, got {type(text_len).__name__}")
    if not 0 <= text_len <= seq_len:
        raise ValueError(f"text_len must lie in [0, S={seq_len}], got {text_len}")
    return text_len


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Kernels take any strides but a unit stride on the last dimension; copy only when that is missing."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()
