"""parallel: context parallelism (cogvideox/parallel.py), one guided DiT step (B = 2: uncond | cond) per scheme.

    torchrun --nproc-per-node 8 -m bench parallel       # every scheme of 8 ranks, beside one GPU, same run
    python -m bench parallel                            # one process: the one-GPU step and the predicted plan

Under torchrun with N ranks: a link probe first (all-to-all, ring shift and all-gather bandwidth and the latency
between the ranks, bench.cost_model.Link), then per model a "1-gpu" row (every rank runs the one-process step at the
same time, same seeds, and rank 0's time is the row: each GPU is alone, as a one-GPU user's) and one row per scheme
of N ranks (bench.cost_model.schemes: cfg 1 or 2 times every ulysses x ring): the measured step (the slowest
rank's median), speedup over the 1-gpu row, scaling efficiency (speedup / N), bytes sent per rank and step (exact,
bench.cost_model), % of the link (that volume at the probed bandwidths over the step) and the cost model's
prediction from the 1-gpu row and the probe. The 1-gpu row carries the predicted plan for 2 .. 64 ranks: rows
labelled "predicted", never measured. Other degrees: run again with another --nproc-per-node.
Shapes: full: 2B and 5B at 480x720x49 (17,776 tokens) and 1.5-5B at 768x1360x81 (45,106 tokens, with 5b);
small (CPU): the tiny preset, gloo: numbers that say nothing about GPUs.
"""
from __future__ import annotations

import dataclasses
import os
import time

import torch

from .. import cost_model
from ..flops import DiTShape
from ..harness import quantile, synchronize
from ..runner import Case, Context, Suite, SuiteSkipped, Variant
from . import _build

# model -> (preset, resolution, latent (F, H, W)) at full size; the 1.5 video's 21 latent frames padded to 22.
FULL = {"2b": ("2b", "480x720x49", (13, 60, 90)), "5b": ("5b", "480x720x49", (13, 60, 90)),
        "1.5": ("1.5-5b", "768x1360x81", (22, 96, 170))}
_MESHES: dict = {}          # Parallel -> ParallelMesh, built once per run (groups are collective to create)
_LINK: dict = {}            # device -> (Link, probe details), probed once per run


def world_size() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def parallel_step(model, latents, text, timestep, pm):
    """One guided step as a sampler runs it: this CFG rank's half of the batch through the sequence-parallel model,
    then both halves on every rank (cfg_combine). pm None: the one-process step on the whole batch."""
    from cogvideox import parallel as cp
    with torch.no_grad():
        if pm is None:
            return model(latents, text, timestep)
        c, half = pm.cfg_rank, latents.shape[0] // pm.settings.cfg
        part = slice(c * half, (c + 1) * half)
        return cp.cfg_combine(model(latents[part], text[part], timestep[part], parallel=pm), pm)


class _Timer:
    """The timed function, also timing itself (CUDA events around the call, or the host clock), so that a row's
    collect() knows its median (for speedups, and the slowest rank's time) without the harness's samples."""

    def __init__(self, fn, device: torch.device):
        self.fn, self.device, self.marks, self.last = fn, device, [], None

    def __call__(self):
        if self.device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            self.last = self.fn()
            e.record()
            self.marks.append((s, e))
        else:
            t0 = time.perf_counter()
            self.last = self.fn()
            self.marks.append((time.perf_counter() - t0) * 1e3)
        return self.last

    def median_ms(self, skip: int) -> float:
        """Median of the calls after the first `skip` (the harness's warm-up and memory-measuring calls)."""
        synchronize(self.device)
        ms = [s.elapsed_time(e) for s, e in self.marks] if self.device.type == "cuda" else list(self.marks)
        return quantile(ms[skip:] or ms, 0.5)


def _all_max(value: float, device: torch.device) -> float:
    import torch.distributed as dist
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _agreed(make, device: torch.device):
    """make() on every rank, then agree: if any rank failed to build (OOM, a missing backend), every rank raises,
    so that no rank waits forever in the first collective of a row the others skipped."""
    def wrapped():
        fn, err = None, None
        try:
            fn = make()
        except Exception as e:   # re-raised below, after the other ranks know
            err = e
        if world_size() > 1 and _all_max(1.0 if err is not None else 0.0, device) > 0 and err is None:
            raise RuntimeError("another rank failed to build this row (its error is in its own row)")
        if err is not None:
            raise err
        return fn
    return wrapped


def _mesh(scheme: cost_model.Scheme, device: torch.device):
    from cogvideox import parallel as cp
    settings = cp.Parallel(ulysses=scheme.ulysses, ring=scheme.ring, cfg=scheme.cfg)
    if settings not in _MESHES:
        _MESHES[settings] = cp.init_parallel(settings, device=device)
    return _MESHES[settings]


def _time_op(op, device, reps: int) -> float:
    import torch.distributed as dist
    for _ in range(2):
        op()
    ms = []
    for _ in range(reps):
        dist.barrier()
        synchronize(device)
        t0 = time.perf_counter()
        op()
        synchronize(device)
        ms.append(time.perf_counter() - t0)
    return _all_max(quantile(ms, 0.5), device)   # the slowest rank's median: a collective waits for it


def probe_link(device: torch.device, nbytes: int, reps: int = 10) -> tuple[cost_model.Link, dict]:
    """Bandwidths between this run's ranks, measured now (dist over the world group, fp32 buffers):
    all-to-all of nbytes per rank (sent per rank = (n - 1) / n of it), a ring shift of nbytes to the next rank (an
    all_to_all_single with one non-empty split, as cogvideox.parallel._ring_shift), an all-gather of nbytes / n per
    rank (received per rank = (n - 1) / n nbytes), and the latency of a 1-element-per-rank all-to-all.
    Bandwidth = bytes per rank (the larger of sent and received) / the slowest rank's median time."""
    import torch.distributed as dist
    n, r = dist.get_world_size(), dist.get_rank()
    m = max(nbytes // 4 // n, 1) * n                                # elements, a multiple of n
    src, dst = torch.randn(m, device=device), torch.empty(m, device=device)
    t_a2a = _time_op(lambda: dist.all_to_all_single(dst, src), device, reps)
    send, recv = [0] * n, [0] * n
    send[(r + 1) % n], recv[(r - 1) % n] = m, m
    shifted = torch.empty(m, device=device)
    t_p2p = _time_op(lambda: dist.all_to_all_single(shifted, src, recv, send), device, reps)
    piece = src[: m // n].contiguous()
    # torch 2.13 deprecates all_gather_into_tensor for all_gather_single (older torch lacks the new name)
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    t_ag = _time_op(lambda: all_gather(dst, piece), device, reps)
    tiny_src, tiny_dst = torch.randn(n, device=device), torch.empty(n, device=device)
    t_lat = _time_op(lambda: dist.all_to_all_single(tiny_dst, tiny_src), device, reps)
    moved = 4 * m * (n - 1) / n
    bw = {"a2a": moved / t_a2a, "p2p": 4 * m / t_p2p, "all_gather": moved / t_ag}
    details = {"world": n, "backend": str(dist.get_backend()), "bytes_per_rank": 4 * m,
               **{f"{k}_GBps": v / 1e9 for k, v in bw.items()}, "latency_us": t_lat * 1e6,
               "median_ms": {"a2a": t_a2a * 1e3, "p2p": t_p2p * 1e3, "all_gather": t_ag * 1e3}}
    source = (f"measured in this run: {n} ranks, {details['backend']}, {4 * m / 2**20:.0f} MiB per rank: all-to-all "
              f"{bw['a2a'] / 1e9:.2f} GB/s, shift {bw['p2p'] / 1e9:.2f} GB/s, all-gather {bw['all_gather'] / 1e9:.2f} "
              f"GB/s, latency {t_lat * 1e6:.0f} us")
    return cost_model.Link(a2a=bw["a2a"], p2p=bw["p2p"], all_gather=bw["all_gather"], latency=t_lat,
                           source=source), details


def _link(ctx: Context) -> tuple[cost_model.Link | None, dict | None]:
    """The link the predictions use: probed between this run's ranks (torchrun); on one GPU, the H100 datasheet's
    (labelled, not measured); on one CPU process, none (no plan: a CPU plan from a GPU datasheet means nothing)."""
    key = str(ctx.device)
    if key not in _LINK:
        if world_size() > 1:
            _mesh(cost_model.Scheme(ring=world_size()), ctx.device)   # joins the process group torchrun describes
            link, details = probe_link(ctx.device, (256 << 20) if ctx.device.type == "cuda" else (4 << 20))
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
            if ctx.device.type == "cuda":   # a plan beyond this node crosses NICs: assumed InfiniBand, labelled
                link = dataclasses.replace(link, gpus_per_node=local, inter=cost_model.IB_NDR,
                                          source=f"{link.source}; beyond {local} GPUs: {cost_model.IB_NDR.source}")
            _LINK[key] = link, details
        elif ctx.device.type == "cuda":
            _LINK[key] = cost_model.H100_CLUSTER, {"source": "datasheet"}
        else:
            _LINK[key] = None, None
    return _LINK[key]


def _config(model: str, ctx: Context):
    if ctx.full:
        (config,) = _build.require_cogvideox("config")
        return config.TransformerConfig.preset(FULL[model][0])
    return _build.transformer_config(model, ctx)


def _case(model: str, ctx: Context, world: int) -> Case:
    cfg = _config(model, ctx)
    latent = FULL[model][2] if ctx.full else _build.LATENT[ctx.size]
    res = FULL[model][1] if ctx.full else "tiny " + "x".join(map(str, latent))
    shape = DiTShape.from_config(cfg, _build.BATCH, *latent)
    itemsize = torch.tensor([], dtype=ctx.dtype).element_size()
    gpu = ctx.device.type == "cuda"
    reps = 3 if shape.seq_len > 30000 else 5
    compile_ = ctx.compile
    backend = ("kernels" if gpu else "references (CPU)") + (" + compile_blocks" if compile_ else "")
    state: dict = {}

    def build() -> list[Variant]:
        link, probe = _link(ctx)
        x, text, t = _build.step_inputs(cfg, ctx, latent)
        skip = 1 + (2 if compile_ else 1)            # the harness's warm-up calls and its memory-measuring call

        def make(scheme):
            def make_():
                pm = _mesh(scheme, ctx.device) if scheme.world > 1 else None
                torch.manual_seed(0)                 # the same weights on every rank
                m = _build.ours_transformer(cfg, ctx, "3d", compile_=compile_)
                timer = _Timer(lambda: parallel_step(m, x, text, t, pm), ctx.device)
                state[scheme.label] = timer
                return timer
            return _agreed(make_, ctx.device)

        def predict(scheme, single_ms):
            return cost_model.predict(shape, scheme, single_ms * 1e-3, link, itemsize, overlap=gpu,
                                      memory_bw=ctx.ceilings.copy_gbps * 1e9 if ctx.ceilings else None)

        def collect_single():
            timer = state.pop("1-gpu")
            single = timer.median_ms(skip)
            state["single_ms"], state["out"] = single, timer.last.detach().float().cpu()
            extra = {"single_ms": single, "link": link.source if link else None, "probe": probe}
            if link is None:
                extra["summary"] = "no plan: one CPU process (run under torchrun for measured rows and a plan)"
                return extra
            preds = cost_model.plan(shape, single * 1e-3, link, itemsize, cost_model.PLAN_WORLDS, overlap=gpu,
                                    memory_bw=ctx.ceilings.copy_gbps * 1e9 if ctx.ceilings else None)
            extra["plan"] = [p.as_dict() for p in preds]
            extra["summary"] = "plan (predicted): " + ", ".join(
                f"{w}: {p.scheme.label} {p.speedup:.2f}x" for w, p in cost_model.best(preds).items())
            return extra

        def collect(scheme):
            def collect_():
                timer = state.pop(scheme.label)
                step = _all_max(timer.median_ms(skip), ctx.device)
                out, ref = timer.last.detach().float().cpu(), state.get("out")
                volumes = [sum(c.sent for c in cost_model.rank_collectives(shape, scheme, k)) * itemsize
                           for k in range(scheme.world)]
                busiest = max(range(scheme.world), key=lambda k: volumes[k])
                by_kind = {c.kind: c.sent * itemsize for c in cost_model.rank_collectives(shape, scheme, busiest)}
                extra = {"scheme": scheme.label, "world": scheme.world, "step_ms_slowest_rank": step,
                         "bytes_per_rank": volumes[busiest], "bytes_per_rank_all": volumes, "bytes_by_kind": by_kind,
                         "max_rel_err_vs_1gpu": (None if ref is None else
                                                 ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item())}
                if "single_ms" in state:
                    speedup = state["single_ms"] / step
                    p = predict(scheme, state["single_ms"])
                    pct = cost_model.link_busy_pct(shape, scheme, link, itemsize, step * 1e-3)
                    extra.update(speedup=speedup, efficiency=speedup / scheme.world, link_pct=pct,
                                 predicted=p.as_dict())
                    extra["summary"] = (f"{speedup:.2f}x vs 1-gpu ({100 * speedup / scheme.world:.0f}% efficiency), "
                                        f"{volumes[busiest] / 1e6:.2f} MB sent/rank/step, {pct:.1f}% of link; "
                                        f"predicted {p.step_s * 1e3:.3f} ms ({p.speedup:.2f}x)")
                return extra
            return collect_

        common = dict(pass_="step", backend=backend, min_reps=reps, max_reps=reps, warmup=2 if compile_ else 1,
                      shape={"world": world}, extra={"model": model, "resolution": res, "seq_len": shape.seq_len,
                                                     "heads": shape.heads})
        one = cost_model.Scheme()
        variants = [Variant("1-gpu", make(one), collect=collect_single, **common)]
        if world > 1:
            variants += [Variant(s.label, make(s), collect=collect(s), **common)
                         for s in cost_model.schemes(world, shape.heads)]
        return variants

    case_shape = {"B": _build.BATCH, "latent": list(latent), "seq_len": shape.seq_len, "heads": shape.heads,
                  "layers": shape.num_layers, "dim": shape.dim}
    return Case(f"cp-step {model} {res}", case_shape, build)


def cases(ctx: Context) -> list[Case]:
    _build.require_cogvideox("transformer", "config", "parallel")
    world = world_size()
    if world > 1 and not os.environ.get("RANK"):
        raise SuiteSkipped("WORLD_SIZE is set without RANK: launch with torchrun")
    models = list(ctx.models) + (["1.5"] if ctx.full and "5b" in ctx.models else [])
    return [_case(m, ctx, world) for m in models]


def notes(ctx: Context) -> list[str]:
    world = world_size()
    lines = [f"{world} rank(s). 1-gpu: every rank runs the one-process step at once (rank 0's time); a scheme's "
             "time is its slowest rank's median; speedup = 1-gpu / scheme, efficiency = speedup / ranks.",
             "Bytes: sent per rank and step by the busiest rank (exact: bench/cost_model.py, checked against the "
             "collectives in tests/test_cost_model.py); % of link: those bytes at the bandwidths probed at the "
             "start of the run, over the step.",
             "Predicted (bench/cost_model.py, never measured): from this run's 1-gpu step, the probed link (one "
             "GPU: the H100 datasheet) and the volume; the plan for 2-64 ranks rides on the 1-gpu row."]
    if world == 1:
        lines.append("One process: only the 1-gpu row is measured; `torchrun --nproc-per-node N -m bench parallel` "
                     "measures every scheme of N ranks.")
    if ctx.device.type != "cuda":
        lines.append("CPU run: tiny preset, gloo between processes on a shared CPU: these numbers say nothing about "
                     "GPUs (no NVLink, no overlap, compute-starved ranks).")
    return lines


def report_lines(rows: list[dict]) -> list[str]:
    """report.md: measured schemes beside their predictions, then each model's predicted plan."""
    ok = [r for r in rows if r["status"] == "ok" and r["suite"] == "parallel"]
    if not ok:
        return []
    out = ["| case | scheme | ranks | measured ms | speedup | efficiency | MB sent / rank / step | % of link "
           "| predicted ms | predicted speedup |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in ok:
        e, p = r["extra"], r["extra"].get("predicted") or {}
        if "scheme" not in e:
            out.append(f"| {r['case']} | 1-gpu | 1 | {e.get('single_ms', r['median_ms']):.3f} | 1.00x | - | 0 | - "
                       f"| - | - |")
            continue
        eff = "-" if e.get("efficiency") is None else f"{100 * e['efficiency']:.0f}%"
        speedup = "-" if e.get("speedup") is None else f"{e['speedup']:.2f}x"
        pct = "-" if e.get("link_pct") is None else f"{e['link_pct']:.1f}"
        pred = "-" if not p else f"{p['predicted_ms']:.3f} (predicted)"
        pred_speedup = "-" if not p else f"{p['speedup']:.2f}x"
        out.append(f"| {r['case']} | {e['scheme']} | {e['world']} | {e['step_ms_slowest_rank']:.3f} | {speedup} | "
                   f"{eff} | {e['bytes_per_rank'] / 1e6:.2f} | {pct} | {pred} | {pred_speedup} |")
    for r in ok:
        plan = r["extra"].get("plan")
        if not plan:
            continue
        out += ["", f"Plan for `{r['case']}` (PREDICTED, not measured; from the 1-gpu row "
                    f"{r['extra']['single_ms']:.3f} ms; link: {r['extra']['link']}):", "",
                "| ranks | fastest scheme | predicted ms | speedup | efficiency | MB sent / rank / step |",
                "|---:|---|---:|---:|---:|---:|"]
        fastest = {}
        for p in plan:
            if p["world"] not in fastest or p["predicted_ms"] < fastest[p["world"]]["predicted_ms"]:
                fastest[p["world"]] = p
        for w, p in fastest.items():
            out.append(f"| {w} | {p['scheme']} | {p['predicted_ms']:.3f} (predicted) | {p['speedup']:.2f}x | "
                       f"{100 * p['efficiency']:.0f}% | {p['bytes_per_rank'] / 1e6:.2f} |")
    return out


SUITE = Suite("parallel", "context parallelism under torchrun: every scheme vs one GPU, bytes, link, cost model",
              cases, notes)
