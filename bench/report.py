"""report.md and the PNG plots of one results.json (matplotlib with the Agg backend; without matplotlib the report
says so and the plots are skipped)."""
from __future__ import annotations

import os

from . import flops, paper
from .runner import CPU_NO_PEAK_MEM, SMALL_NO_CEILING, group_not_run, mem


def _fmt(v, spec=".3f", none="-"):
    if v is None:
        return none
    if spec == "num":   # 3 significant digits without exponents: 2250, 75.3, 0.00896
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return format(v, spec)


def _mem(n, kind=None):
    return "n/a" if n is None and kind == CPU_NO_PEAK_MEM else mem(n, none="-")


def _shape(shape: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in shape.items() if k not in ("resolution",))


def rows_table(rows: list[dict]) -> list[str]:
    out = ["| case | impl | pass | backend | median ms | p20-p80 ms | GB/s | TFLOP/s | % of ceiling | peak mem |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["status"] != "ok":
            continue
        pct = "-" if r.get("pct_of_ceiling") is None else f"{_fmt(r['pct_of_ceiling'], 'num')} ({r['ceiling']})"
        out.append(f"| {r['case']} | {r['impl']} | {r['pass']} | {r.get('backend') or '-'} | {r['median_ms']:.3f} | "
                   f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f} | {_fmt(r.get('gbps'), 'num')} | "
                   f"{_fmt(r.get('tflops'), 'num')} | {pct} | "
                   f"{_mem(r.get('peak_mem_bytes'), r.get('peak_mem_kind'))} |")
    return out


def table8(rows: list[dict]) -> list[str]:
    """Ours vs the paper's Table 8: one DiT step per resolution and layout, and the 3D / 2D+1D ratio."""
    steps, ref, label = {}, {}, {}
    for r in rows:
        if r["status"] == "ok" and r["suite"] == "attention" and r["pass"] == "step":
            e = r["extra"]
            steps[(e["resolution"], e["model"], e["layout"])] = r["median_ms"] / 1e3
            # small rows ran a stand-in latent grid: name that, not the paper's resolution
            label[e["resolution"]] = (e["resolution"] if r.get("size") != "small" or "latent" not in r["shape"]
                                      else "latent " + "x".join(map(str, r["shape"]["latent"])))
            if r.get("paper"):   # only rows at the paper's shapes carry its numbers
                ref[(e["resolution"], e["layout"])] = r["paper"]["table8_h800_s"]
    if not steps:
        return []
    out = [f"Paper: Table 8 ({paper.TABLE8_DEVICE}).", "",
           "| resolution | model | tokens | ours 2D+1D s | ours 3D s | ours 3D/2D+1D | paper 2D+1D s | paper 3D s "
           "| paper 3D/2D+1D |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for res, model in sorted({(k[0], k[1]) for k in steps}):
        a, b = steps.get((res, model, "2d+1d")), steps.get((res, model, "3d"))
        p2, p3 = ref.get((res, "2d+1d")), ref.get((res, "3d"))
        tokens = next(r["extra"].get("seq_len") for r in rows if r["status"] == "ok" and r["pass"] == "step"
                      and r["extra"]["resolution"] == res and r["extra"]["model"] == model)
        ratio, paper_ratio = (b / a if a and b else None), (p3 / p2 if p2 and p3 else None)
        out.append(f"| {label[res]} | {model} | {tokens} | {_fmt(a)} | {_fmt(b)} | {_fmt(ratio, '.2f')} | "
                   f"{_fmt(p2, '.2f')} | {_fmt(p3, '.2f')} | {_fmt(paper_ratio, '.2f')} |")
    return out


def table7(rows: list[dict]) -> list[str]:
    """Ours vs the paper's Table 7 and the official H100 times: the whole pipeline, split into its parts."""
    e2e = [r for r in rows if r["status"] == "ok" and r["suite"] == "e2e"]
    if not e2e:
        return []
    out = [f"Paper: Table 7 ({paper.TABLE7_DEVICE}); official repository: H100, 480x720x49, 50 steps.", "",
           "| case | impl | total s | transformer s | scheduler+rest s | VAE s | peak mem | paper s / GB "
           "| official H100 s |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in e2e:
        e = r["extra"]
        p = r.get("paper") or {}   # only rows at the paper's shapes carry its numbers
        ref = (p["table7_h800_s"], p["table7_h800_gb"]) if "table7_h800_s" in p else None
        official = p.get("official_h100_s")
        out.append(f"| {r['case']} | {r['impl']} | {r['median_ms'] / 1e3:.2f} | "
                   f"{_fmt(e.get('transformer_s'), '.2f')} | {_fmt(e.get('scheduler_s'), '.2f')} | "
                   f"{_fmt(e.get('vae_s'), '.2f')} | "
                   f"{_mem(r.get('peak_mem_bytes'), r.get('peak_mem_kind'))} | "
                   f"{f'{ref[0]} / {ref[1]}' if ref else '-'} | "
                   f"{official if official else '-'} |")
    return out


def render(doc: dict, plots: list[str], plot_note: str | None) -> str:
    env, dev, c = doc["environment"], doc["device"], doc["ceilings"]
    git = env.get("git", {})
    lines = ["# CogVideoX kernels: benchmark report", "",
             f"- created {doc['created']}, size `{doc['size']}`, command `{' '.join(doc.get('argv', []))}`",
             f"- device: {dev.get('name')} ({dev.get('type')}), torch {env['torch']}, triton {env['triton']}, "
             f"CUDA {env['cuda']}, driver {env['driver']}, diffusers {env.get('diffusers')}",
             f"- commit {git.get('commit')}{' (uncommitted changes)' if git.get('dirty') else ''}"]
    if c and "error" in c:
        lines.append(f"- ceilings: not measured ({c['error']}); no % of ceiling in the tables")
    elif c and doc["size"] == "small":
        lines.append(f"- ceilings measured (copy {c['copy_gbps']:.1f} GB/s, matmul {c['matmul_tflops']:.2f} TFLOP/s), "
                     f"but {SMALL_NO_CEILING}")
    elif c:
        lines.append(f"- ceilings measured at the start of this run: copy {c['copy_gbps']:.1f} GB/s "
                     f"({c['copy_bytes'] / 2**20:.0f} MiB, read + write), matmul {c['matmul_tflops']:.2f} TFLOP/s "
                     f"({c['matmul_n']}^3 {c['matmul_dtype']})")
    tel = doc["telemetry"]
    if not tel.get("available"):
        lines.append(f"- telemetry: not recorded ({tel.get('reason')})")
    else:
        s = tel.get("static", {})
        lines.append(f"- telemetry (NVML): {s.get('name')}, driver {s.get('driver')}, power limit "
                     f"{_fmt(s.get('power_limit_w'), '.0f')} W, max SM clock {s.get('max_sm_clock_mhz')} MHz")
        throttled = [n for n, v in tel.get("suites", {}).items() if v.get("throttled")]
        if throttled:
            lines.append(f"- **THROTTLING seen during: {', '.join(throttled)}** (reasons: "
                         + "; ".join(f"{n}: {', '.join(tel['suites'][n]['throttle_reasons'])}" for n in throttled)
                         + "): those timings were taken below normal clocks")
    if doc.get("cpu_note"):
        lines.append(f"- {doc['cpu_note']}")
    if dev.get("type") != "cuda":
        lines.append("- **GPU rows were not run**: this is a CPU run at small shapes; the Triton kernels and the "
                     "paper's shapes need a CUDA GPU.")
    for name, s in doc["suites"].items():
        lines += ["", f"## {name}", ""]
        if s["status"] == "skipped":
            lines.append(f"skipped: {s['reason']}")
            continue
        lines += [f"- {n}" for n in s.get("notes", [])]
        t = tel.get("suites", {}).get(name, {})
        if t.get("samples"):
            clk, pw, tc = t.get("sm_clock_mhz", {}), t.get("power_w", {}), t.get("temp_c", {})
            lines.append(f"- telemetry: SM clock {_fmt(clk.get('min'), '.0f')}-{_fmt(clk.get('max'), '.0f')} MHz, "
                         f"power max {_fmt(pw.get('max'), '.0f')} W, temperature max {_fmt(tc.get('max'), '.0f')} C"
                         + (f", **throttled: {', '.join(t['throttle_reasons'])}**" if t.get("throttled") else "")
                         + (f", clock-event (throttle) reasons unreadable in {t['throttle_unread']} of "
                            f"{t['samples']} samples" if t.get("throttle_unread") else ""))
        rows = [r for r in doc["rows"] if r["suite"] == name]
        shapes = {r["case"]: r["shape"] for r in rows}
        kinds = sorted({r["peak_mem_kind"] for r in rows if r.get("peak_mem_kind")})
        if kinds:
            lines.append(f"- peak mem: {', '.join(kinds)}")
        lines += ["", *rows_table(rows), ""]
        lines += [f"- `{case}`: {_shape(shape)}" for case, shape in shapes.items()]
        if name == "attention":
            lines += ["", *table8(rows)]
        if name == "e2e":
            lines += ["", *table7(rows)]
        if name == "parallel":
            from .suites.parallel import report_lines
            lines += ["", *report_lines(rows)]
        other = group_not_run(rows)
        if other:
            lines += ["", "Not run:", ""]
            lines += [f"- {line}" for line in other]
    lines += ["", "## Plots", ""]
    if plot_note:
        lines.append(plot_note)
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def make_plots(doc: dict, out_dir: str) -> tuple[list[str], str | None]:
    """Returns (file names written, a note when plots were skipped or empty)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "Plots skipped: matplotlib is not installed (pip install matplotlib)."
    written = []
    steps = [r for r in doc["rows"] if r["status"] == "ok" and r["suite"] == "attention" and r["pass"] == "step"]
    if steps:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for model in sorted({r["extra"]["model"] for r in steps}):
            for layout, style in (("3d", "-o"), ("2d+1d", "--s")):
                pts = sorted((r["extra"]["seq_len"], r["median_ms"] / 1e3) for r in steps
                             if r["extra"]["model"] == model and r["extra"]["layout"] == layout)
                if pts:
                    ax.plot(*zip(*pts), style, label=f"ours {model} {layout}")
        if doc["size"] == "full":
            for layout, marker in (("3d", "x"), ("2d+1d", "+")):
                pts = [(flops.TEXT_LEN + paper.vision_tokens(*paper.TABLE8_SHAPES[res]), s)
                       for res, s in paper.TABLE8_SECONDS[layout].items()]
                ax.plot(*zip(*pts), marker, markersize=10, color="k", label=f"paper H800 {layout}")
        ax.set_xlabel("sequence length (text + vision tokens)")
        ax.set_ylabel("seconds per DiT forward step")
        ax.set_title(f"DiT step vs sequence length ({doc['device'].get('name')}, {doc['size']} shapes)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        _save(fig, os.path.join(out_dir, "dit_step_vs_seq.png"))
        written.append("dit_step_vs_seq.png")
    kern = [r for r in doc["rows"] if r["status"] == "ok" and r["suite"] == "kernels"]
    # % of the copy ceiling where there is one (full shapes), else GB/s (small shapes: SMALL_NO_CEILING)
    pct = [r for r in kern if r.get("pct_of_ceiling") is not None]
    key, ylabel, name = (("pct_of_ceiling", "% of measured copy bandwidth\n(minimum bytes)", "kernels_pct_of_ceiling")
                         if pct else ("gbps", "GB/s (minimum bytes)", "kernels_gbps"))
    kern = pct or [r for r in kern if r.get("gbps") is not None]
    if kern:
        labels = list(dict.fromkeys(f"{r['case']} {r['pass']}" for r in kern))
        impls = list(dict.fromkeys(r["impl"] for r in kern))
        width = 0.8 / len(impls)
        fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(labels)), 5))
        for i, impl in enumerate(impls):
            vals = {f"{r['case']} {r['pass']}": r[key] for r in kern if r["impl"] == impl}
            xs = [j + i * width for j, lab in enumerate(labels) if lab in vals]
            ax.bar(xs, [vals[lab] for lab in labels if lab in vals], width, label=impl)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
        ax.set_xticklabels(labels, rotation=70, ha="right", fontsize=7)
        ax.set_ylabel(ylabel)
        what = "% of ceiling" if pct else "GB/s (no ceiling at small shapes)"
        ax.set_title(f"kernels: {what} ({doc['device'].get('name')}, {doc['size']} shapes)")
        ax.legend(fontsize=8)
        _save(fig, os.path.join(out_dir, f"{name}.png"))
        written.append(f"{name}.png")
    return written, (None if written else "No plots: neither the attention step rows nor kernel rows ran.")


def _save(fig, path: str) -> None:
    """Save with the bounding box grown to every label: tight_layout alone clipped the kernels plot's y label
    (the rotated case names take most of the height)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)


def write(doc: dict, out_dir: str, plots: bool = True) -> str:
    files, note = make_plots(doc, out_dir) if plots else ([], "Plots skipped (--no-plots).")
    text = render(doc, files, note)
    path = os.path.join(out_dir, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path
