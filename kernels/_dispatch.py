"""What every op in `kernels` shares: which implementation runs, and the input checks.

Dispatch rule (one place, so every op behaves the same):
- CUDA tensors run the Triton kernels.
- CPU tensors run the pure-torch reference, unless the environment sets both `COGVIDEOX_KERNELS=triton` and
  `TRITON_INTERPRET=1` (the latter before triton is imported): then the Triton kernels run in the interpreter.
  That is how CI checks the real kernels without a GPU.
- `COGVIDEOX_KERNELS=torch` forces the reference everywhere (for debugging and for benchmarks of the baseline).
"""
from __future__ import annotations

import functools
import math
import numbers
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


def check_params(x: torch.Tensor, size: int, **params) -> None:
    """Optional 1-D per-channel parameters (LayerNorm / GroupNorm weight and bias): each None or a (size,) float
    tensor on x's device (any float dtype: fp32 parameters with half activations are allowed)."""
    for name, p in params.items():
        if p is not None:
            check_tensor(name, p, ndim=1)
            check_like(name, p, "x", x, dtype=False)
            check_shape(name, p, (size,))


def check_text_len(text_len, seq_len: int | None) -> int:
    """An int in [0, seq_len]; seq_len None: any int >= 0 (a context-parallel shard may hold text tokens only, the
    global text_len then exceeds its offset + S)."""
    if isinstance(text_len, bool) or not isinstance(text_len, int):
        raise TypeError(f"text_len must be an int, got {type(text_len).__name__}")
    if seq_len is None and text_len < 0:
        raise ValueError(f"text_len must be >= 0, got {text_len}")
    if seq_len is not None and not 0 <= text_len <= seq_len:
        raise ValueError(f"text_len must lie in [0, S={seq_len}], got {text_len}")
    return text_len


def check_finite_float(name: str, v) -> float:
    """A finite real number (an int or a numpy scalar too, not a bool) -> float; TypeError / ValueError naming
    `name`. Non-finite numbers are errors everywhere they are accepted: a NaN or inf eps, theta or position only
    yields NaN."""
    if isinstance(v, bool) or not isinstance(v, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if not -math.inf < v < math.inf:   # comparisons, not math.isfinite: under torch.compile v may be a SymFloat
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def check_positive_float(name: str, v) -> float:
    """A finite real number > 0 -> float (as check_finite_float)."""
    if isinstance(v, bool) or not isinstance(v, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if not 0 < v < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {v}")
    return v


def check_eps(eps) -> float:
    """The normalization epsilon of every op: a finite float > 0 (eps <= 0 divides by zero on a constant row)."""
    return check_positive_float("eps", eps)


def local_text_len(text_len: int, seq_len: int, offset: int = 0) -> int:
    """Text rows of the shard [offset, offset + seq_len) of a joint [text | vision] sequence with text_len text
    tokens: the shard's rows [0, result) are text. sym_min / sym_max keep a symbolic seq_len symbolic under
    torch.compile (on plain ints they are min / max)."""
    return torch.sym_min(torch.sym_max(text_len - offset, 0), seq_len)


def check_offset(offset) -> int:
    """A shard's global index of its first token (context parallelism): an int >= 0, not a bool."""
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    return offset


def last_dim_contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    """Kernels take any strides but a unit stride on the last dimension; copy only when that is missing.
    None (an absent optional input) passes through."""
    if t is None or t.stride(-1) == 1 or t.shape[-1] == 1:
        return t
    return t.contiguous()


INTERPRETER_SMS = 1  # the CPU interpreter: few programs, so small test shapes still give multi-row programs


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (what persistent-style launchers size their grids by)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_SMS


MAX_GRID = (2**31 - 1, 65535, 65535)  # CUDA's limits on grid x, y, z; the interpreter checks none of them


def check_grid(grid: tuple) -> tuple:
    """ValueError if a launch grid exceeds CUDA's limits (the launch would fail on the GPU, not in the tests)."""
    if any(n > limit for n, limit in zip(grid, MAX_GRID)):
        raise ValueError(f"tensor too large for one launch: grid {tuple(grid)} exceeds CUDA's {MAX_GRID}")
    return grid
