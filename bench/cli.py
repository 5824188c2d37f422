"""python -m bench: run benchmark suites, write results.json + report.md + plots, compare with an earlier run.

    python -m bench                      every suite that fits the device (CPU: small shapes, a few minutes)
    python -m bench kernels attention    chosen suites (or --suites kernels,attention)
    python -m bench --list               the suites
    python -m bench --compare OLD.json   run, then print each row's time against OLD.json
    python -m bench --compare OLD.json --against NEW.json   compare two saved runs, run nothing
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from typing import TYPE_CHECKING

from . import results

if TYPE_CHECKING:   # annotations only: importing runner imports torch
    from .runner import Context

# torch (and everything that imports it) is imported after the arguments are parsed: `--help` and argument errors
# come back at once instead of after seconds of importing.
SIZES = ("auto", "small", "full")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}   # torch dtype names
MODELS = ("2b", "5b")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("suite_names", nargs="*", metavar="SUITE", help="suites to run (default: all)")
    p.add_argument("--suites", default=None, help="comma-separated suites (same as positional names)")
    p.add_argument("--list", action="store_true", help="list the suites and exit")
    p.add_argument("--out", default=None, help="output folder (default: a new bench/runs/<timestamp>/)")
    p.add_argument("--size", choices=SIZES, default="auto",
                   help="small: CPU-sized shapes; full: the paper's shapes (needs a GPU); auto: full on a GPU "
                        "(cases that do not fit its memory are skipped), small on a CPU")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--models", default=",".join(MODELS), help="model sizes, comma-separated (2b, 5b)")
    p.add_argument("--filter", default=None, help="run only cases whose name contains this text")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed repetitions per row (default: 1.0 on a GPU, 0.2 on a CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for a CPU run (default: 1, stable timings on shared machines)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="run the torch.compile rows (default on a GPU)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the torch.compile rows (default on a CPU)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--static", action="store_true",
                   help="kernels suite: print what the sm_90 builds at the real launch arguments predict (registers, "
                        "occupancy, SASS access widths, bytes moved); runs nothing, needs no GPU")
    p.add_argument("--compare", default=None, metavar="OLD.json", help="print each row's ratio against OLD.json")
    p.add_argument("--against", default=None, metavar="NEW.json",
                   help="with --compare: compare two saved runs without running anything")
    return p


def _split(s: str | None) -> list[str]:
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def resolve(args, suites: dict) -> tuple[list, Context]:
    """Turn arguments into (suites, context) or raise BenchArgumentError; nothing has run yet."""
    import torch

    from .runner import BenchArgumentError, Context
    names = list(args.suite_names) + _split(args.suites)
    unknown = [n for n in names if n not in suites]
    if unknown:
        raise BenchArgumentError(f"unknown suite(s) {', '.join(unknown)}; choose from {', '.join(suites)}")
    chosen = [suites[n] for n in dict.fromkeys(names)] if names else list(suites.values())
    models = tuple(_split(args.models))
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        raise BenchArgumentError(f"unknown model size(s) {bad or models}; choose from {', '.join(MODELS)}")
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError as e:
            raise BenchArgumentError(f"--device {args.device!r}: {e}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BenchArgumentError("--device cuda but torch sees no CUDA device")
        if device.type not in ("cuda", "cpu"):
            raise BenchArgumentError(f"--device must be cuda or cpu, got {args.device!r}")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:   # under torchrun: this rank's GPU
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    size = args.size
    if size == "full" and device.type != "cuda":
        raise BenchArgumentError("--size full runs the paper's shapes, which need a CUDA GPU; this run is on "
                                 "the CPU (use --size small)")
    if size == "auto":
        size = "full" if device.type == "cuda" else "small"
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else (torch.bfloat16 if device.type == "cuda"
                                                                      else torch.float32)
    if args.budget is not None and not args.budget > 0:
        raise BenchArgumentError(f"--budget must be > 0 seconds, got {args.budget}")
    budget = args.budget if args.budget is not None else (1.0 if device.type == "cuda" else 0.2)
    if args.threads is not None and args.threads < 1:
        raise BenchArgumentError(f"--threads must be >= 1, got {args.threads}")
    ctx = Context(device=device, size=size, dtype=dtype, budget_s=budget, models=models, filter=args.filter,
                  size_requested=args.size != "auto",
                  compile=args.compile if args.compile is not None else device.type == "cuda")
    return chosen, ctx


def _out_dir(arg: str | None) -> str:
    if arg:
        return arg
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs", stamp)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import torch

    from . import report
    from .runner import BenchArgumentError, plan
    from .suites import SUITES
    if args.list:
        for s in SUITES.values():
            print(f"{s.name:10s} {s.description}")
        return 0
    if args.static:
        return _static(args)
    try:
        if args.against:
            if not args.compare:
                raise BenchArgumentError("--against needs --compare OLD.json")
            old, new = results.load(args.compare), results.load(args.against)
            print(results.format_compare(*results.compare(old, new)))
            return 0
        old = results.load(args.compare) if args.compare else None
        chosen, ctx = resolve(args, SUITES)
        planned = plan(chosen, ctx)
        out_dir = _out_dir(args.out)
        os.makedirs(out_dir, exist_ok=True)
    except (BenchArgumentError, results.SchemaError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    threads_before = torch.get_num_threads()
    lead = os.environ.get("RANK", "0") == "0"   # under torchrun every rank runs; rank 0 prints and writes
    try:
        doc = run(planned, ctx, argv if argv is not None else sys.argv[1:], threads=args.threads,
                  progress=None if lead else (lambda line: None))
    finally:
        torch.set_num_threads(threads_before)   # main() also runs inside other programs (tests)
    if not lead:
        return 0
    path = os.path.join(out_dir, "results.json")
    try:
        results.dump(doc, path)
    except results.SchemaError as e:   # a harness bug: keep the measurements anyway, then fail loudly
        with open(os.path.join(out_dir, "results.invalid.json"), "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, default=str)
        print(f"error: results fail the schema check ({e}); saved as results.invalid.json", file=sys.stderr)
        return 1
    rep = report.write(doc, out_dir, plots=not args.no_plots)
    print(f"wrote {path} and {rep}")
    if ctx.device.type != "cuda":
        print("GPU rows were not run: this was a CPU run at small shapes; the Triton kernels and the paper's "
              "shapes need a CUDA GPU.")
    if old is not None:
        text = results.format_compare(*results.compare(old, doc))
        with open(os.path.join(out_dir, "compare.md"), "w", encoding="utf-8") as f:
            f.write(text + "\n")
        print(text)
    return 0


def _static(args) -> int:
    names = list(args.suite_names) + _split(args.suites)
    if names != ["kernels"]:
        print("error: --static applies to the kernels suite alone: python -m bench kernels --static", file=sys.stderr)
        return 2
    from .suites.kernels import DIT, format_static, static_rows
    models = tuple(_split(args.models))
    if not models or any(m not in DIT for m in models):
        print(f"error: unknown model size(s) in {args.models!r}; choose from {', '.join(DIT)}", file=sys.stderr)
        return 2
    print(format_static(static_rows(models, args.filter)))
    from .traffic import format_traffic, traffic_rows
    print()
    print(format_traffic(traffic_rows(models)))
    return 0


def run(planned, ctx: Context, argv: list[str], progress=None, threads: int | None = None) -> dict:
    """Measure the ceilings, run every planned suite under telemetry, and return the results document."""
    import torch

    from .runner import run_planned
    from .harness import CPU_THREADS_NOTE, device_info, environment, measure_ceilings
    from .telemetry import Telemetry
    progress = progress or (lambda line: print(line, flush=True))
    cpu_note = None
    if ctx.device.type == "cpu":
        torch.set_num_threads(threads or 1)
        cpu_note = f"{torch.get_num_threads()} CPU thread(s)" + ("" if threads else f": {CPU_THREADS_NOTE}")
    else:
        torch.cuda.set_device(ctx.device)   # models, events and the allocator stats all use this device
    telemetry = Telemetry(ctx.device)
    progress(f"device {device_info(ctx.device)['name']} ({ctx.device}), size {ctx.size}, dtype {ctx.dtype_name}")
    ceilings_error = None
    try:
        ctx.ceilings = measure_ceilings(ctx.device)
    except Exception as e:  # e.g. OOM on a GPU another process fills: the rows still run, without % of ceiling
        ceilings_error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    if ceilings_error is not None:
        from .harness import release
        release(ctx.device)
        ctx.ceilings = None
        progress(f"warning: the ceilings could not be measured ({ceilings_error}); no row gets a % of ceiling")
    else:
        progress(f"ceilings: copy {ctx.ceilings.copy_gbps:.1f} GB/s, matmul {ctx.ceilings.matmul_tflops:.2f} "
                 f"TFLOP/s ({ctx.ceilings.matmul_dtype})")
    rows, suites = [], {}
    for p in planned:
        with telemetry.during(p.suite.name):
            suite_rows, summary = run_planned(p, ctx, progress)
        if telemetry.suites.get(p.suite.name, {}).get("throttled"):
            progress(f"[{p.suite.name}] warning: the GPU throttled during this suite: "
                     f"{', '.join(telemetry.suites[p.suite.name]['throttle_reasons'])}")
        rows += suite_rows
        suites[p.suite.name] = summary
    return {
        "schema_version": results.SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(argv), "size": ctx.size, "dtype": ctx.dtype_name, "cpu_note": cpu_note,
        "device": device_info(ctx.device), "environment": environment(telemetry.driver()),
        "ceilings": ctx.ceilings.as_dict() if ctx.ceilings else {"error": ceilings_error},
        "telemetry": telemetry.as_dict(), "suites": suites, "rows": rows,
    }
