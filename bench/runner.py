"""The harness's run half: what a suite declares (Suite, Case, Variant), the plan with its fit check, and the loop
that times every variant into one result row.

A suite lists cases without allocating anything (so a bad request fails before any work); a case builds its
inputs lazily and returns variants (one timed row each: an implementation and a pass); a variant builds its timed
function right before timing (so two large models never sit in memory together) and drops it after.
Missing targets never crash a run: a suite raises SuiteSkipped, a case or variant carries `skip`, and an import
error while building becomes a skipped row with its reason. Any other exception becomes an "error" row.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

from .harness import Ceilings, free_device_memory, measure, release

SIZES = ("auto", "small", "full")

# Why small rows get no "% of ceiling": the ceilings are measured on arrays far larger than any cache (a 256 MB+
# copy, a large matmul), while a small case's working set fits in the CPU's caches, so it can run faster than the
# "ceiling": issue 12 saw 264%; expert_adaln 2b fwd, eager fp32, 1 thread, reached 4.3 GB/s against a 2.9 GB/s copy
# ceiling (148%) on an Intel Xeon CPU, 2026-12-01, `python -m bench kernels attention --budget 0.01`.
SMALL_NO_CEILING = ("no % of ceiling at small shapes: their working sets fit in the caches, so the copy and matmul "
                    "ceilings, measured on arrays far larger than any cache, do not bound them (CPU rows exceeded "
                    "100% of the copy ceiling); GB/s and TFLOP/s are given instead")
# Why CPU rows have no peak memory: the only CPU measure is the process's resident set, which does not grow when
# the allocator reuses memory an earlier row freed, so it was 0 for most rows and changed with the run order.
CPU_NO_PEAK_MEM = ("n/a on CPU: the process's peak resident set is not per row (the allocator reuses memory freed "
                   "by earlier rows: most rows read 0 and the numbers changed with the run order)")


class SuiteSkipped(Exception):
    """Raised by a suite's cases() when its target cannot run here; the message is the reason."""


class BenchArgumentError(ValueError):
    """A request that cannot be satisfied (unknown suite, a shape that does not fit); raised before any work."""


@dataclass
class Context:
    device: torch.device
    size: str                       # "small" (CPU-sized) or "full" (the paper's shapes)
    dtype: torch.dtype
    budget_s: float = 1.0           # timing budget per row
    models: tuple = ("2b", "5b")
    filter: str | None = None       # substring a case name must contain
    size_requested: bool = False    # the user asked for this size (a case that does not fit is then an error)
    compile: bool = True            # run the torch.compile rows (default off on a CPU: minutes of compiling)
    ceilings: Ceilings | None = None

    @property
    def full(self) -> bool:
        return self.size == "full"

    @property
    def no_compile_reason(self) -> str | None:
        if self.compile:
            return None
        if self.device.type == "cpu":
            return ("torch.compile rows are off by default on a CPU (they compile for minutes and say nothing about "
                    "the GPU); `python -m bench --compile` or, under pytest, BENCH_COMPILE=1 runs them")
        return "torch.compile rows are off (--no-compile / BENCH_COMPILE=0)"

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")


@dataclass
class Variant:
    impl: str                                   # "eager", "compile", "ours", a backend name, ...
    make: Callable[[], Callable[[], object]] | None = None  # builds the timed function
    pass_: str = "fwd"
    skip: str | None = None
    flops: float | None = None                  # work per call, for TFLOP/s against the matmul ceiling
    bytes: float | None = None                  # minimum bytes per call, for GB/s against the copy ceiling
    backend: str | None = None                  # what really ran (e.g. "triton" or "torch-reference")
    budget_s: float | None = None               # overrides Context.budget_s
    min_reps: int = 3
    max_reps: int = 100
    warmup: int = 1
    collect: Callable[[], dict] | None = None   # extra fields gathered after timing (e.g. a time split)
    extra: dict = field(default_factory=dict)
    shape: dict = field(default_factory=dict)   # merged over the case's shape (variants of one case may differ)
    label: str | None = None                    # appended to the case name in the row (variants that differ by shape)
    paper: dict | None = None                   # the paper's numbers for this row, printed beside ours


@dataclass
class Case:
    name: str
    shape: dict
    build: Callable[[], list[Variant]] | None = None
    est_bytes: int = 0                          # device memory the case needs, for the fit check
    skip: str | None = None


@dataclass
class Suite:
    name: str
    description: str
    cases: Callable[[Context], list[Case]]
    notes: Callable[[Context], list[str]] = lambda ctx: []


@dataclass
class PlannedSuite:
    suite: Suite
    cases: list[Case] = field(default_factory=list)
    skipped: str | None = None
    notes: list[str] = field(default_factory=list)


def mem(n: float | None, none: str = "?") -> str:
    if n is None:
        return none
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def plan(suites: list[Suite], ctx: Context) -> list[PlannedSuite]:
    """List every case and check that it fits, before anything runs. Raises BenchArgumentError when the user
    explicitly asked for a size whose cases do not fit; otherwise such cases are skipped with the reason."""
    free = free_device_memory(ctx.device)
    planned, too_big = [], []
    for suite in suites:
        p = PlannedSuite(suite)
        try:
            p.cases = [c for c in suite.cases(ctx) if not ctx.filter or ctx.filter in c.name]
            p.notes = list(suite.notes(ctx))
        except SuiteSkipped as e:
            p.skipped = str(e) or "skipped"
        for c in p.cases:
            if c.skip is None and free is not None and c.est_bytes > 0.9 * free:
                c.skip = f"does not fit: needs about {mem(c.est_bytes)}, {mem(free)} free on {ctx.device.type}"
                if ctx.size_requested:
                    too_big.append(f"{suite.name}: {c.name} ({c.skip})")
        planned.append(p)
    if ctx.filter and not any(p.cases for p in planned):
        raise BenchArgumentError(f"--filter {ctx.filter!r} matches no case of the chosen suites "
                                 f"(case names look like 'expert_adaln 5b', 'dit-step 2b', 'vae decode ...')")
    if too_big:
        raise BenchArgumentError("these cases do not fit this device; choose a smaller --size or --filter:\n  "
                                 + "\n  ".join(too_big))
    return planned


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _row(suite: str, case: Case, v: Variant, ctx: Context, status: str, reason: str | None = None) -> dict:
    device_name = (torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu")
    name = f"{case.name} {v.label}" if v.label else case.name
    return {"suite": suite, "case": name, "impl": v.impl, "pass": v.pass_, "status": status,
            "reason": reason, "device": device_name, "device_type": ctx.device.type,
            "dtype": ctx.dtype_name, "size": ctx.size, "shape": {**case.shape, **v.shape}, "backend": v.backend,
            "flops": v.flops, "bytes": v.bytes, "paper": v.paper, "extra": dict(v.extra)}


def _metrics(row: dict, t, ceilings: Ceilings | None) -> None:
    seconds = t.median_ms * 1e-3
    row.update(t.as_dict())
    row["tflops"] = row["flops"] / seconds / 1e12 if row["flops"] else None
    row["gbps"] = row["bytes"] / seconds / 1e9 if row["bytes"] else None
    row["ceiling"], row["pct_of_ceiling"] = None, None
    if ceilings is not None and row["size"] != "small":   # SMALL_NO_CEILING
        # Work that has FLOPs is judged against the matmul roof, pure data movement against the copy roof.
        if row["tflops"] is not None:
            row["ceiling"], row["pct_of_ceiling"] = "matmul", 100 * row["tflops"] / ceilings.matmul_tflops
        elif row["gbps"] is not None:
            row["ceiling"], row["pct_of_ceiling"] = "copy", 100 * row["gbps"] / ceilings.copy_gbps


def format_row(row: dict) -> str:
    head = f"[{row['suite']}] {row['case']} | {row['impl']} {row['pass']}"
    if row["status"] != "ok":
        return f"{head}: {row['status']}: {row['reason']}"
    s = f"{head}: {row['median_ms']:.3f} ms (p20 {row['p20_ms']:.3f}, p80 {row['p80_ms']:.3f}, n={row['reps']})"
    for key, unit in (("tflops", " TFLOP/s"), ("gbps", " GB/s"), ("pct_of_ceiling", f"% of {row.get('ceiling')}")):
        v = row.get(key)
        if v is not None:
            s += f", {v:.0f}{unit}" if abs(v) >= 100 else f", {v:.3g}{unit}"
    if row.get("peak_mem_bytes") is not None:
        s += f", peak {mem(row['peak_mem_bytes'])}"
    if row.get("extra", {}).get("summary"):   # a suite's own one-line result (e.g. parallel: speedup, predicted)
        s += f" | {row['extra']['summary']}"
    return s


def run_variant(suite: str, case: Case, v: Variant, ctx: Context) -> dict:
    if v.skip:
        return _row(suite, case, v, ctx, "skipped", v.skip)
    # release() runs after the except blocks, never inside one: inside, the exception's traceback still holds the
    # frames (a half-built model, an OOM'd forward's activations), so nothing could be freed.
    fn, failed = None, None
    try:
        fn = v.make()
    except (ImportError, SuiteSkipped) as e:
        failed = _row(suite, case, v, ctx, "skipped", _skip_reason(e))
    except Exception as e:
        failed = _row(suite, case, v, ctx, "error", _describe(e))
    if failed is not None:
        release(ctx.device)
        return failed
    row = _row(suite, case, v, ctx, "ok")
    try:
        t, row["peak_mem_bytes"], row["peak_mem_kind"] = measure(
            fn, ctx.device, budget_s=v.budget_s or ctx.budget_s, min_reps=v.min_reps, max_reps=v.max_reps,
            warmup=v.warmup)
        if ctx.device.type != "cuda":
            row["peak_mem_bytes"], row["peak_mem_kind"] = None, CPU_NO_PEAK_MEM
        _metrics(row, t, ctx.ceilings)
        if v.collect is not None:
            row["extra"].update(v.collect())
    except Exception as e:
        row = _row(suite, case, v, ctx, "error", _describe(e))
    del fn
    release(ctx.device)
    return row


def _skip_reason(e: BaseException) -> str:
    return str(e) if isinstance(e, SuiteSkipped) else f"not importable: {e}"


def _describe(e: BaseException) -> str:
    if _is_oom(e):
        return f"out of memory: {str(e).splitlines()[0][:300]}"
    tb = traceback.extract_tb(e.__traceback__)
    where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}{where}"


def group_not_run(rows: list[dict]) -> list[str]:
    """One line per (status, impl, reason) of the rows that did not run, with their count and the first few
    cases: an unavailable backend would otherwise repeat once per shape (157 lines in a CPU run)."""
    groups: dict = {}
    for r in rows:
        if r["status"] != "ok":
            groups.setdefault((r["status"], r["impl"], r["reason"]), []).append(f"{r['case']} {r['pass']}")
    return [f"{impl}: {status}: {reason} ({len(where)} row{'s' if len(where) > 1 else ''}: "
            f"{', '.join(where[:3])}{', ...' if len(where) > 3 else ''})"
            for (status, impl, reason), where in groups.items()]


def run_case(suite: str, case: Case, ctx: Context, progress: Callable[[str], None] = print) -> list[dict]:
    """Run a case's variants. Progress gets ok and error rows as they finish; skipped rows are left to the
    suite's grouped summary (run_planned)."""
    if case.skip:
        return [_row(suite, case, Variant(impl="*", pass_="*"), ctx, "skipped", case.skip)]
    row = None
    try:
        variants = case.build()
    except Exception as e:
        skipped = isinstance(e, (ImportError, SuiteSkipped))
        row = _row(suite, case, Variant(impl="*", pass_="*"), ctx, "skipped" if skipped else "error",
                   _skip_reason(e) if skipped else _describe(e))
    if row is not None:     # outside the except block, so that the traceback's frames can be freed
        if row["status"] != "skipped":
            progress(format_row(row))
        release(ctx.device)
        return [row]
    rows = []
    while variants:
        # pop, not `for v in variants`: the loop variable would keep the last variant (and a model its make()
        # closure shares, e.g. the attention suite's per-case model) alive through the release() below.
        v = variants.pop(0)
        row = run_variant(suite, case, v, ctx)
        if row["status"] != "skipped":
            progress(format_row(row))
        rows.append(row)
        del v
    del variants
    release(ctx.device)
    return rows


def run_planned(p: PlannedSuite, ctx: Context, progress: Callable[[str], None] = print) -> tuple[list[dict], dict]:
    """Run one planned suite; returns (rows, suite summary for results.json)."""
    t0 = time.perf_counter()
    if p.skipped:
        progress(f"[{p.suite.name}] skipped: {p.skipped}")
        return [], {"status": "skipped", "reason": p.skipped, "notes": p.notes, "wall_s": 0.0}
    for note in p.notes:
        progress(f"[{p.suite.name}] {note}")
    rows = []
    for case in p.cases:
        rows.extend(run_case(p.suite.name, case, ctx, progress))
    for line in group_not_run([r for r in rows if r["status"] == "skipped"]):   # errors were printed one by one
        progress(f"[{p.suite.name}] not run: {line}")
    statuses = {r["status"] for r in rows}
    status = "ok" if statuses == {"ok"} else ("skipped" if statuses <= {"skipped"} else "partial")
    reason = None
    if status == "skipped":
        reason = "; ".join(sorted({r["reason"] for r in rows})) or "no cases"
    return rows, {"status": status, "reason": reason, "notes": p.notes, "wall_s": time.perf_counter() - t0,
                  "cases": len(p.cases)}
