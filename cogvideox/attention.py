"""attention(q, k, v): the one seam every attention call in the model goes through.

Layout: q, k, v are (B, S, H, Dh) (the natural layout after the fused QKV projection); the output is (B, S, H, Dh).
Full bidirectional attention, no mask, scale 1/sqrt(Dh): what CogVideoX uses (diffusers-cogvideox.md section 2.4).
Packed sequences (multi-resolution frame packing, a `kernels.Segments` layout): q, k, v are (1, N, H, Dh) and each
segment's tokens attend to their own segment only, through a variable-length backend (VARLEN_BACKENDS, below): the
flash-attention varlen kernels where installed, else torch's own varlen flash / memory-efficient kernels on CUDA,
or FlexAttention with a document block mask; on CPU dense SDPA per segment. No padding, no (N, N) mask in memory.

Backends live in a small registry: a name, the function, and a function giving the reason it cannot run for a
device / dtype / head dim (None when it can). Optional packages are imported once, below; a missing one only removes
its backend. backend=None picks the fastest backend that can run, in the order of `PREFERENCE` (measured, source
given there), and logs the choice once per (device, dtype, head dim). The choice is made in
`_resolve`, which torch.compile runs at trace time and treats as a constant, so the compiled graph holds only the
chosen kernel (no graph break; tests/test_attention.py checks fullgraph=True).
"""
from __future__ import annotations

import functools
import logging
import operator
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger(__name__)

# ---- optional packages: imported here and nowhere else -------------------------------------------------------
try:  # FlashAttention 2 (PyPI flash-attn, a CUDA source build)
    from flash_attn import flash_attn_func as _fa2_func
except ImportError:
    _fa2_func = None
try:  # FlashAttention 3 (the "hopper" build of flash-attention installs flash_attn_interface)
    from flash_attn_interface import flash_attn_func as _fa3_func
except ImportError:
    _fa3_func = None
try:  # FlashAttention 4 (PyPI flash-attn-4, CuTe DSL)
    from flash_attn.cute import flash_attn_func as _fa4_func
except ImportError:
    _fa4_func = None
try:
    import xformers.ops as _xops
except ImportError:
    _xops = None
try:  # the variable-length (packed) entry points of FlashAttention 2 and 3
    from flash_attn import flash_attn_varlen_func as _fa2_varlen_func
except ImportError:
    _fa2_varlen_func = None
try:
    from flash_attn_interface import flash_attn_varlen_func as _fa3_varlen_func
except ImportError:
    _fa3_varlen_func = None


class AttentionBackendError(ValueError):
    """A forced attention backend that does not exist or cannot run on these inputs."""


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (B, S, H, Dh) x3 -> (B, S, H, Dh)
    # (device, dtype, head_dim) -> why this backend cannot run there, or None if it can
    unavailable: Callable[[torch.device, torch.dtype, int], Optional[str]]


# ---- backend functions (all take and return (B, S, H, Dh)) ---------------------------------------------------
def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _sdpa_only(kind: SDPBackend):
    # torch.nn.attention.sdpa_kernel pins one SDPA implementation; Dynamo traces the context manager.
    def fn(q, k, v):
        with sdpa_kernel(kind):
            return _sdpa(q, k, v)
    return fn


def _first(out):  # FA3 / FA4 return (out, lse) in some releases
    return out[0] if isinstance(out, tuple) else out


def _fa2(q, k, v):
    return _fa2_func(q, k, v)


def _fa3(q, k, v):
    return _first(_fa3_func(q, k, v))


def _fa4(q, k, v):
    return _first(_fa4_func(q, k, v))


def _xformers(q, k, v):
    return _xops.memory_efficient_attention(q, k, v)


# ---- reasons a backend cannot run ----------------------------------------------------------------------------
_HALF = (torch.float16, torch.bfloat16)


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


@functools.lru_cache(maxsize=None)
def _torch_rejects(check: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    """Why torch's own SDPA sub-backend `check` (a torch.backends.cuda.can_use_* name) refuses this device / dtype /
    head dim, or None. The static limits above cannot see the build (flash compiled in or not), the cuDNN version
    or torch's per-release rules, and `sdpa_kernel(X)` with a refused X fails at the first call with "No available
    kernel". Asked once per key on tiny tensors laid out as the transformer passes them to `_sdpa`: q, k
    (B, S, H, Dh) seen as (B, H, S, Dh), v a slice of the fused QKV projection's output."""
    can_use = getattr(torch.backends.cuda, check, None)
    if can_use is None:   # a torch without this query: the static limits stand
        return None
    q, k = (torch.empty(1, 128, 2, head_dim, device=device, dtype=dtype).transpose(1, 2) for _ in range(2))
    v = torch.empty(1, 128, 3, 2, head_dim, device=device, dtype=dtype)[:, :, 2].transpose(1, 2)
    try:
        params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, False, False)   # torch >= 2.5 (enable_gqa)
    except TypeError:
        params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, False)
    with warnings.catch_warnings(record=True) as caught:   # debug=True: torch warns each reason it refuses
        warnings.simplefilter("always")
        ok = can_use(params, True)
    if ok:
        return None
    why = "; ".join(str(w.message).strip() for w in caught)
    return f"torch.backends.cuda.{check} refuses it" + (f": {why}" if why else "")


def _needs(package_ok: bool = True, package: str = "", cuda: bool = True, dtypes=_HALF, max_head_dim: int = 256,
           head_dim_multiple: int = 1, min_sm: tuple[int, int] = (0, 0), max_sm: tuple[int, int] = (99, 99),
           torch_check: Optional[str] = None):
    def reason(device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
        if not package_ok:
            return f"package {package} is not installed"
        if cuda and device.type != "cuda":
            return f"needs a CUDA device, got {device.type}"
        if dtype not in dtypes:
            return f"dtype {dtype} not supported (supports {', '.join(str(d) for d in dtypes)})"
        if head_dim > max_head_dim or head_dim % head_dim_multiple:
            return f"head dim {head_dim} not supported (needs <= {max_head_dim}, a multiple of {head_dim_multiple})"
        if cuda:
            sm = _capability(device)
            if not min_sm <= sm <= max_sm:
                lo, hi = "%d%d" % min_sm, "%d%d" % max_sm
                return f"compute capability sm_{sm[0]}{sm[1]} outside sm_{lo}..sm_{hi}"
        if torch_check is not None:
            return _torch_rejects(torch_check, device, dtype, head_dim)
        return None
    return reason


_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

BACKENDS: dict[str, Backend] = {b.name: b for b in [
    Backend("sdpa", _sdpa, _needs(cuda=False, dtypes=_FLOAT, max_head_dim=1 << 30)),
    Backend("sdpa-math", _sdpa_only(SDPBackend.MATH), _needs(cuda=False, dtypes=_FLOAT, max_head_dim=1 << 30)),
    Backend("sdpa-cudnn", _sdpa_only(SDPBackend.CUDNN_ATTENTION),
            _needs(max_head_dim=128, head_dim_multiple=8, min_sm=(8, 0), torch_check="can_use_cudnn_attention")),
    Backend("sdpa-flash", _sdpa_only(SDPBackend.FLASH_ATTENTION),
            _needs(max_head_dim=256, head_dim_multiple=8, min_sm=(8, 0), torch_check="can_use_flash_attention")),
    Backend("sdpa-efficient", _sdpa_only(SDPBackend.EFFICIENT_ATTENTION),
            _needs(dtypes=_HALF + (torch.float32,), head_dim_multiple=8, min_sm=(5, 0),
                   torch_check="can_use_efficient_attention")),
    Backend("flash-attn-2", _fa2, _needs(_fa2_func is not None, "flash-attn", min_sm=(8, 0))),
    Backend("flash-attn-3", _fa3, _needs(_fa3_func is not None, "flash-attn 3 (flash_attn_interface)",
                                         min_sm=(9, 0), max_sm=(9, 9))),
    # conservative limits for FA4: Hopper and Blackwell, head dims up to 128
    Backend("flash-attn-4", _fa4, _needs(_fa4_func is not None, "flash-attn-4", max_head_dim=128,
                                         head_dim_multiple=8, min_sm=(9, 0))),
    Backend("xformers", _xformers, _needs(_xops is not None, "xformers", dtypes=_HALF + (torch.float32,))),
]}

# Fastest first. Measured (FA3 paper, H100 SXM, forward, non-causal, head dim 64, ~16k tokens, bf16; quoted in
# ../shared/reference/kernel-notes.md): flash-attn-3 ~497, sdpa-cudnn ~413, flash-attn-2 ~324 TFLOP/s. The rest are
# not in that measurement and come after it: sdpa-flash runs FA2's kernel inside torch; FA4 targets Blackwell
# first and is unmeasured on Hopper here; then xformers, torch's efficient kernel, and the default SDPA dispatch
# (which is also what runs on CPU). bench/ times every `available_backends(q)`: update this order from its rows.
PREFERENCE = ("flash-attn-3", "sdpa-cudnn", "flash-attn-2", "sdpa-flash", "flash-attn-4", "xformers",
              "sdpa-efficient", "sdpa", "sdpa-math")

_CHOSEN: dict[tuple, str] = {}  # (device, dtype, head_dim) -> backend picked by backend=None, logged once


def _reasons(device: torch.device, dtype: torch.dtype, head_dim: int, registry: dict = BACKENDS,
             order: tuple = PREFERENCE) -> dict[str, Optional[str]]:
    return {name: registry[name].unavailable(device, dtype, head_dim) for name in order}


def _report(reasons: dict[str, Optional[str]]) -> str:
    return "\n".join(f"  {n}: {r or 'available'}" for n, r in reasons.items())


def _choose(what: str, registry: dict, order: tuple, backend: Optional[str], device: torch.device,
            dtype: torch.dtype, head_dim: int, key: tuple, veto=None) -> str:
    """The backend of `registry` to run: `backend` when forced (AttentionBackendError if unknown or unable, with
    every backend's reason), else the first of `order` that can run, chosen once per `key` and logged. Only an
    uncached choice asks every backend (a forced one asks its own), so the eager hot path stays a dict lookup.
    veto(name): a reason to pass over a backend in the automatic choice only (None: no veto)."""
    if backend is not None:
        if backend not in registry:
            raise AttentionBackendError(f"unknown {what} backend {backend!r}; known: {', '.join(order)}")
        reason = registry[backend].unavailable(device, dtype, head_dim)
        if reason is not None:
            raise AttentionBackendError(
                f"{what} backend {backend!r} cannot run on {device} {dtype} head dim {head_dim}: {reason}\n"
                f"all backends:\n{_report(_reasons(device, dtype, head_dim, registry, order))}")
        return backend
    if key not in _CHOSEN:
        reasons = _reasons(device, dtype, head_dim, registry, order)
        if veto is not None:
            reasons = {n: r or veto(n) for n, r in reasons.items()}
        ok = [n for n, r in reasons.items() if r is None]
        if not ok:  # cannot happen for float inputs: sdpa (sdpa-per-segment) runs everywhere
            raise AttentionBackendError(f"no {what} backend can run on {device} {dtype}:\n{_report(reasons)}")
        _CHOSEN[key] = ok[0]
        log.info("%s backend for %s %s head_dim %d: %s", what, device, dtype, head_dim, ok[0])
    return _CHOSEN[key]


@torch.compiler.assume_constant_result
def _resolve(backend: Optional[str], device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    # Runs eagerly even under torch.compile (assume_constant_result), so logging and the cache are fine here.
    return _choose("attention", BACKENDS, PREFERENCE, backend, device, dtype, head_dim, (device, dtype, head_dim))


def available_backends(q: torch.Tensor) -> list[str]:
    """Names of the backends that can run on q's device, dtype and head dim, fastest first."""
    return [n for n, r in _reasons(q.device, q.dtype, q.shape[-1]).items() if r is None]


# ---- packed (variable-length) attention ------------------------------------------------------------------------
def _fa_varlen(fn):
    def run(q, k, v, segments):                                    # (N, H, Dh) each
        cu, n = segments.cu_seqlens, segments.max_len
        return _first(fn(q, k, v, cu, cu, n, n))
    return run


def _sdpa_varlen(q, k, v, segments):
    # torch's own varlen kernels (what its nested-tensor SDPA calls on CUDA), on dense (N, H, Dh) tensors so that
    # activation checkpointing can save them (it cannot save nested tensors): FA2 for half dtypes, the
    # memory-efficient kernel for fp32. Both have autograd formulas. Contiguous inputs (v is a strided slice).
    cu, n = segments.cu_seqlens, segments.max_len
    q, k, v = (t.contiguous() for t in (q, k, v))
    if q.dtype in _HALF:
        return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, n, n, 0.0, False, False)[0]
    return torch.ops.aten._efficient_attention_forward(q[None], k[None], v[None], None, cu, cu, n, n, 0.0, 0,
                                                       torch.is_grad_enabled())[0][0]


def _sdpa_per_segment(q, k, v, segments):
    # The fallback that runs everywhere (torch has no CPU varlen kernel): dense SDPA on each segment's slice.
    return torch.cat([_sdpa(q[None, a:b], k[None, a:b], v[None, a:b])[0] for a, b in segments.ranges()])


_flex_compiled = None


def _flex(q, k, v, segments):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _flex_compiled
    if q.is_cuda and _flex_compiled is None:   # FlexAttention is a fused kernel only under torch.compile
        _flex_compiled = torch.compile(flex_attention, dynamic=True)
    run = _flex_compiled if q.is_cuda else flex_attention
    if not q.is_cuda:   # only reached without grad (_flex_reason); flex refuses CPU inputs that require grad
        q, k, v = q.detach(), k.detach(), v.detach()
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")  # CPU: eager only
    N = q.shape[0]
    # document id of every token: the number of segment starts at or before it, minus one
    doc = torch.bucketize(torch.arange(N, device=q.device, dtype=torch.int32), segments.cu_seqlens[1:-1],
                          right=True)

    def same_segment(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    mask = create_block_mask(same_segment, None, None, N, N, device=q.device)
    out = run(*(t.transpose(0, 1)[None] for t in (q, k, v)), block_mask=mask)   # (1, H, N, Dh)
    return out[0].transpose(0, 1)


def _flex_reason(device, dtype, head_dim):
    if device.type != "cuda" and torch.is_grad_enabled():
        return "FlexAttention has no CPU backward (runs on CPU only without grad)"
    if dtype not in _FLOAT[:3]:
        return f"dtype {dtype} not supported"
    return None


VARLEN_BACKENDS: dict[str, Backend] = {b.name: b for b in [
    Backend("flash-attn-3", _fa_varlen(_fa3_varlen_func),
            _needs(_fa3_varlen_func is not None, "flash-attn 3 (flash_attn_interface)", min_sm=(9, 0), max_sm=(9, 9))),
    Backend("flash-attn-2", _fa_varlen(_fa2_varlen_func),
            _needs(_fa2_varlen_func is not None, "flash-attn", min_sm=(8, 0))),
    Backend("sdpa-varlen", _sdpa_varlen, _needs(dtypes=_HALF + (torch.float32,), head_dim_multiple=8,
                                                min_sm=(8, 0))),
    Backend("flex", _flex, _flex_reason),
    Backend("sdpa-per-segment", _sdpa_per_segment, _needs(cuda=False, dtypes=_FLOAT, max_head_dim=1 << 30)),
]}
# Fastest first: flash-attention's varlen kernels; torch's own (FA2 / memory-efficient, no compilation); then
# FlexAttention (a compiled Triton kernel with a document block mask, a compilation per new shape); last, dense
# SDPA per segment, which runs everywhere (the CPU path). The CUDA backends are unmeasured (and unrun) here.
VARLEN_PREFERENCE = ("flash-attn-3", "flash-attn-2", "sdpa-varlen", "flex", "sdpa-per-segment")


@torch.compiler.assume_constant_result
def _resolve_varlen(backend: Optional[str], device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    # as _resolve: eager even under torch.compile, a constant of the graph

    def veto(name):   # eager FlexAttention holds the (N, N) scores: on CPU only when asked by name
        if name == "flex" and device.type != "cuda":
            return "on CPU FlexAttention runs eagerly (the full score matrix): by name only"
        return None

    return _choose("packed-attention", VARLEN_BACKENDS, VARLEN_PREFERENCE, backend, device, dtype, head_dim,
                   ("varlen", device, dtype, head_dim, torch.is_grad_enabled()), veto)


def packed_attention(q, k, v, segments, backend: str | None = None) -> torch.Tensor:
    """attention() on a packed sequence: q, k, v (1, N, H, Dh) laid out by `segments` (a kernels.Segments) ->
    (1, N, H, Dh); a token attends only to the tokens of its own segment. backend: a VARLEN_BACKENDS name or None."""
    from kernels.segments import check_segments

    check_segments(segments)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"packed attention expects (1, N, H, Dh) tensors, got {name} {tuple(t.shape)}")
        segments.check(name, t)
    if k.shape != v.shape or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share dtype: {q.dtype}/{k.dtype}/{v.dtype}")
    name = _resolve_varlen(backend, q.device, q.dtype, operator.index(q.shape[-1]))
    return VARLEN_BACKENDS[name].fn(q[0], k[0], v[0], segments)[None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str | None = None,
              parallel=None, seq_len: int | None = None, segments=None) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh)) v over all tokens. q, k, v: (B, S, H, Dh) -> (B, S, H, Dh).

    backend: a name in BACKENDS, or None for the fastest available (logged once). A forced backend that cannot run
    raises AttentionBackendError listing why each backend is or is not usable.
    parallel: a `cogvideox.parallel.ParallelMesh` whose sequence group holds the sequence of `seq_len` tokens, this
    rank's contiguous shard in q, k, v (as ParallelMesh.shard_range splits it): Ulysses all-to-alls around the
    chosen backend, or ring attention (torch's flash kernels with their log-sum-exp), or both
    (cogvideox/parallel.py). The only place in the model where tokens of other ranks are seen.
    segments: a `kernels.Segments`: q, k, v are a packed (1, N, H, Dh) sequence, each segment attending to itself
    (`packed_attention`; backend then names a VARLEN_BACKENDS entry).
    """
    if segments is not None:
        if parallel is not None:
            raise ValueError("packed sequences (segments=) and context parallelism (parallel=) do not combine")
        return packed_attention(q, k, v, segments, backend)
    if parallel is not None and parallel.settings.seq > 1:
        from .parallel import parallel_attention

        if seq_len is None:
            raise ValueError("attention(parallel=...) needs seq_len, the length of the whole sharded sequence")
        return parallel_attention(q, k, v, parallel, seq_len, lambda q, k, v: attention(q, k, v, backend))
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects (B, S, H, Dh) tensors, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise TypeError(f"q, k, v must share dtype and device: {q.dtype}/{k.dtype}/{v.dtype}, "
                        f"{q.device}/{k.device}/{v.device}")
    # operator.index: under dynamic shapes Dynamo specializes the head dim with a guard (int() would leave a
    # SymInt, which the constant-result call cannot take); eagerly it is a plain int.
    name = _resolve(backend, q.device, q.dtype, operator.index(q.shape[-1]))
    return BACKENDS[name].fn(q, k, v)
