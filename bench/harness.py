"""Timing, peak memory and the device's two ceilings: the measurement half of the harness (bench/runner.py runs
suites with it).

Timing follows triton.testing.do_bench: a warm-up (which also absorbs compilation), then every repetition timed on
its own, between CUDA events on a GPU with the L2 cache flushed before each one (a 256 MB write, outside the
events), or with time.perf_counter on a CPU. The statistics are the same on both: median and the 20% / 80%
quantiles (linear interpolation, numpy's default), plus min, max and the count.
"""
from __future__ import annotations

import gc
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch


def quantile(values, q: float) -> float:
    """Linear-interpolation quantile of a non-empty sequence (numpy.quantile's default method)."""
    if not values:
        raise ValueError("quantile of an empty sequence")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must lie in [0, 1], got {q}")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    max_ms: float
    reps: int

    @classmethod
    def from_samples(cls, ms) -> "Timing":
        ms = list(ms)
        return cls(quantile(ms, 0.5), quantile(ms, 0.2), quantile(ms, 0.8), min(ms), max(ms), len(ms))

    def as_dict(self) -> dict:
        return asdict(self)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_L2_FLUSH: dict = {}


def _flush_key(device: torch.device) -> torch.device:
    # "cuda" and "cuda:0" are the same buffer: key by the resolved index.
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    # 256 MB, as do_bench: larger than any current GPU's L2 (H100 50 MB), so every repetition starts cold.
    key = _flush_key(device)
    if key not in _L2_FLUSH:
        _L2_FLUSH[key] = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)
    return _L2_FLUSH[key]


def _l2_flush_bytes(device: torch.device) -> int:
    """Bytes of the L2 flush buffer alive on device (0 before the first CUDA timing): not part of any row."""
    buf = _L2_FLUSH.get(_flush_key(device)) if device.type == "cuda" else None
    return 0 if buf is None else buf.numel() * buf.element_size()


def measure(fn: Callable[[], object], device: torch.device, budget_s: float = 1.0, min_reps: int = 3,
            max_reps: int = 100, warmup: int = 1) -> tuple[Timing, int | None, str]:
    """Time fn() and measure its peak memory; returns (timing, peak bytes, what the peak measures).

    `warmup` untimed calls (the first includes any compilation), then one call that measures the peak memory
    and the time per call, then as many timed repetitions as fit in budget_s, clamped to [min_reps, max_reps].
    A call slower than the whole budget with min_reps = 1 (an end-to-end run) is timed once: that measuring
    call is the sample."""
    if min_reps < 1 or max_reps < min_reps or warmup < 0:
        raise ValueError(f"need 1 <= min_reps <= max_reps and warmup >= 0, got {min_reps}, {max_reps}, {warmup}")
    for _ in range(warmup):
        fn()
    with PeakMemory(device) as peak:
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        estimate = time.perf_counter() - t0
    if min_reps == 1 and estimate >= budget_s:
        return Timing.from_samples([estimate * 1e3]), peak.bytes, peak.kind
    reps = int(min(max(budget_s / max(estimate, 1e-9), min_reps), max_reps))
    if device.type == "cuda":
        flush = _l2_flush_buffer(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        with torch.cuda.device(device):     # events record on the current stream of the current device
            for s, e in zip(starts, ends):
                flush.zero_()
                s.record()
                fn()
                e.record()
        torch.cuda.synchronize(device)
        samples = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return Timing.from_samples(samples), peak.bytes, peak.kind


# ---- peak memory ---------------------------------------------------------------------------------------------

def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    # Linux: writing 5 to clear_refs resets this process's VmHWM (peak RSS) to the current RSS.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """with PeakMemory(device) as p: ...; then p.bytes, p.kind.

    CUDA: torch.cuda.max_memory_allocated over the block (inputs and weights included, as the paper's memory
    column; the harness's own 256 MB L2 flush buffer, alive from the first timed CUDA row on, excluded).
    CPU: how far the process's resident set rose above its level at the start of the block (Linux VmHWM
    after a reset, minus VmRSS; inputs made before the block are not counted), None where /proc cannot be used."""

    def __init__(self, device: torch.device):
        self.device, self.bytes, self.kind, self._rss0 = device, None, "unavailable", None
        self._exclude = 0

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._exclude = _l2_flush_bytes(self.device)
            self.kind = "cuda max_memory_allocated"
        elif _reset_rss_peak() and (rss := _proc_status_bytes("VmRSS")) is not None:
            self._rss0 = rss
            self.kind = "process RSS growth (VmHWM - VmRSS at start)"
        else:
            self.kind = "unavailable (no /proc/self/clear_refs)"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = max(int(torch.cuda.max_memory_allocated(self.device)) - self._exclude, 0)
        elif self._rss0 is not None:
            peak = _proc_status_bytes("VmHWM")
            self.bytes = None if peak is None else max(peak - self._rss0, 0)
        return False


CPU_THREADS_NOTE = ("CPU timings use 1 thread by default (--threads N to change): on a machine whose cores are "
                    "shared, multi-threaded ops wait for descheduled OpenMP threads (medians of 200 ms for 0.3 ms "
                    "ops were measured on a busy 2-core machine); CPU rows are small-shape smoke numbers anyway")


def free_device_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    return avail


def release(device: torch.device) -> None:
    """Free what the last row left behind before the next one builds (an 80 GB card runs a 5B model per row):
    collect reference cycles, wait for the device's queued work (the next row's build and timing start from an
    idle device), then return the cached blocks. Dynamo's caches are not reset here: a compiled module
    does not stay alive through them once deleted (checked with the eager and inductor backends), and the
    attention suite reuses one dynamic-shape compile across resolutions on purpose."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ---- ceilings ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ceilings:
    copy_gbps: float       # device-to-device copy, bytes read + written per second, 1e9
    matmul_tflops: float   # square matmul, 1e12 FLOP/s
    copy_bytes: int        # size of the copied tensor
    matmul_n: int
    matmul_dtype: str
    copy_timing: dict
    matmul_timing: dict

    def as_dict(self) -> dict:
        return asdict(self)


def measure_ceilings(device: torch.device, budget_s: float = 1.0) -> Ceilings:
    """The two roofs every row is compared against, measured now on this device.

    GPU: copy of a 1 GiB tensor (GB/s counts the read and the write), 8192^3 bf16 matmul. CPU: small fp32
    equivalents (64 MiB copy, 1024^3 matmul), enough to stay out of cache without taking seconds."""
    if device.type == "cuda":
        copy_elems, n, dtype = (1 << 30) // 2, 8192, torch.bfloat16
        free = free_device_memory(device) or 0
        while copy_elems * 2 * 2 + 3 * n * n * 2 > free * 0.8 and copy_elems > (1 << 24):
            copy_elems //= 2
    else:
        copy_elems, n, dtype = (64 << 20) // 4, 1024, torch.float32
    src = torch.randn(copy_elems, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    t_copy = measure(lambda: dst.copy_(src), device, budget_s=budget_s, min_reps=5, max_reps=200, warmup=3)[0]
    copy_bytes = src.numel() * src.element_size()
    del src, dst
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t_mm = measure(lambda: a @ b, device, budget_s=budget_s, min_reps=5, max_reps=200, warmup=3)[0]
    del a, b
    release(device)
    return Ceilings(copy_gbps=2 * copy_bytes / (t_copy.median_ms * 1e-3) / 1e9,
                    matmul_tflops=2 * n ** 3 / (t_mm.median_ms * 1e-3) / 1e12,
                    copy_bytes=copy_bytes, matmul_n=n, matmul_dtype=str(dtype).replace("torch.", ""),
                    copy_timing=t_copy.as_dict(), matmul_timing=t_mm.as_dict())


# ---- environment ---------------------------------------------------------------------------------------------

def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "unknown")
    except Exception as e:  # a broken optional install must not stop a benchmark run
        return None if isinstance(e, ImportError) else f"error: {e}"


def git_commit(root: str | None = None) -> dict:
    import subprocess
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError) as e:
        return {"commit": None, "dirty": None, "error": str(e)}


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "index": device.index, "name": p.name, "memory_bytes": int(p.total_memory),
                "capability": f"sm_{p.major}{p.minor}", "multiprocessors": p.multi_processor_count}
    import platform
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"type": "cpu", "name": name, "threads": torch.get_num_threads(), "memory_bytes": free_device_memory(device)}


def environment(driver: str | None = None) -> dict:
    import platform
    import sys
    return {
        "python": sys.version.split()[0], "platform": platform.platform(),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _version("triton"), "diffusers": _version("diffusers"), "numpy": _version("numpy"),
        "driver": driver, "git": git_commit(),
        "env": {k: os.environ[k] for k in ("COGVIDEOX_KERNELS", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")
                if k in os.environ},
    }
