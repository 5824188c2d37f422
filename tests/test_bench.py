"""The benchmark harness (bench/): statistics, FLOP and byte formulas against hand-computed values, the result
schema, report and plots, --compare, argument errors, telemetry, and a CPU run of every suite at tiny shapes."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from bench import flops, paper, report, results
from bench.cli import main
from bench.harness import Timing, measure, quantile
from bench.runner import BenchArgumentError, Case, Context, Suite, SuiteSkipped, Variant, plan, run_planned
from bench.telemetry import Telemetry, decode_reasons, summarize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


# ---- statistics ------------------------------------------------------------------------------------------------

def test_quantile_matches_hand_computed_linear_interpolation():
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]               # sorted 1..5: position q * 4
    assert quantile(xs, 0.5) == 3.0
    assert quantile(xs, 0.2) == pytest.approx(1.8)   # 1 + 0.8 * (2 - 1)
    assert quantile(xs, 0.8) == pytest.approx(4.2)   # 4 + 0.2 * (5 - 4)
    assert quantile([7.0], 0.2) == 7.0
    assert quantile([1.0, 2.0], 0.5) == 1.5
    t = Timing.from_samples([4.0, 1.0, 2.0, 3.0])    # sorted 1..4: position q * 3
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.min_ms, t.max_ms, t.reps) == \
        (2.5, pytest.approx(1.6), pytest.approx(3.4), 1.0, 4.0, 4)
    with pytest.raises(ValueError):
        quantile([], 0.5)
    with pytest.raises(ValueError):
        quantile([1.0], 1.5)


def test_measure_counts_warmup_and_repetitions():
    calls = []
    t, peak, kind = measure(lambda: calls.append(1), CPU, budget_s=0.0, min_reps=3, max_reps=5, warmup=2)
    assert len(calls) == 2 + 1 + 3          # warm-up, the measuring call, min_reps timed repetitions
    assert t.reps == 3 and 0 < t.min_ms <= t.p20_ms <= t.median_ms <= t.p80_ms <= t.max_ms
    assert kind                              # says what the peak means (or why it is missing)
    calls.clear()
    t, _, _ = measure(lambda: calls.append(1), CPU, budget_s=10.0, min_reps=1, max_reps=4, warmup=0)
    assert len(calls) == 1 + 4 and t.reps == 4   # a fast call fills the budget up to max_reps
    calls.clear()
    t, _, _ = measure(lambda: calls.append(1), CPU, budget_s=0.0, min_reps=1, max_reps=4, warmup=0)
    assert len(calls) == 1 and t.reps == 1       # slower than the budget with min_reps 1: timed once
    with pytest.raises(ValueError):
        measure(lambda: None, CPU, min_reps=3, max_reps=2)


# ---- FLOP and byte formulas ------------------------------------------------------------------------------------

def test_attention_and_gemm_flops_hand_computed():
    assert flops.gemm_flops(3, 4, 5) == 120
    assert flops.attention_flops(1, 1, 2, 3) == 48                      # 4 * 1 * 1 * 2 * 2 * 3
    # CogVideoX-2B, 480x720x49, B = 2: 4 * 2 * 30 * 64 = 15,360 times 17776^2 = 315,986,176, per block
    assert flops.attention_flops(2, 30, 17776, 64) == 4_853_547_663_360
    assert flops.attention_flops(2, 1, 3, 4, seq_k=5) == 4 * 2 * 3 * 5 * 4


def test_dit_step_flops_hand_computed_tiny_shape():
    # B=1, latents F=2, H=W=4, p=2 -> grid (2, 2, 2), N = 8; text 2 -> S = 10; 1 layer, 1 head x 2 (D = 2);
    # C_in = C_out = 1, text width 3, time width 4.
    s = flops.DiTShape(batch=1, frames=2, height=4, width=4, num_layers=1, heads=1, head_dim=2, in_channels=1,
                       out_channels=1, patch_size=2, text_len=2, text_embed_dim=3, time_embed_dim=4)
    assert (s.dim, s.grid, s.vision_tokens, s.seq_len) == (2, (2, 2, 2), 8, 10)
    embed = 2 * 1 * 2 * 4 + 2 * 1 * 4 * 4 + 2 * 8 * 4 * 2 + 2 * 2 * 3 * 2      # 16 + 32 + 128 + 24 = 200
    block = 2 * (2 * 1 * 4 * 12) + 4 * (2 * 10 * 2 * 2) + 2 * 10 * 2 * 8 + 2 * 10 * 8 * 2   # 192 + 320 + 640
    head = 2 * 1 * 4 * 4 + 2 * 8 * 2 * 4                                        # 32 + 128 = 160
    assert embed == 200 and block == 1152 and head == 160
    assert flops.dit_gemm_flops(s, "3d") == 200 + 1152 + 160
    assert flops.dit_gemm_flops(s, "2d+1d") == 1512 + 4 * (2 * 8 * 2 * 2)       # temporal q, k, v, out: +256
    assert flops.dit_attention_flops(s, "3d") == 4 * 1 * 1 * 10 * 10 * 2        # 800
    # 2d+1d: 2 frames x (2 text + 4) tokens, then 4 positions x 2 frames
    assert flops.dit_attention_flops(s, "2d+1d") == 4 * 2 * 6 * 6 * 2 + 4 * 4 * 2 * 2 * 2   # 576 + 128
    assert flops.dit_step_flops(s, "3d") == 1512 + 800
    with pytest.raises(ValueError):
        flops.dit_step_flops(s, "2d")


def test_dit_shape_of_the_paper_configs():
    s = flops.DiTShape(batch=2, frames=13, height=60, width=90, num_layers=30, heads=30)
    assert s.seq_len == 17776 and s.dim == 1920
    s5 = flops.DiTShape(batch=2, frames=11, height=96, width=170, num_layers=42, heads=48)
    assert s5.vision_tokens == 44880
    # 3d attention dominates at high resolution; the 2d+1d layout removes most of it
    assert flops.dit_attention_flops(s5, "3d") > 5 * flops.dit_attention_flops(s5, "2d+1d")


def test_min_bytes_hand_computed():
    B, S, D, E = 2, 17776, 1920, 2
    x = B * S * D * 2
    mod = B * E * D * 2
    wb = D * 2
    got = flops.expert_adaln_bytes(B, S, D, E, itemsize=2)
    assert got["fwd"] == x + 2 * mod + 2 * wb + x                   # x, shift, scale, weight, bias -> out
    assert got["bwd"] == (x + x + mod + wb) + (x + 2 * mod + 2 * wb)   # d_out, x, scale, w -> 5 grads
    assert got["fwd+bwd"] == got["fwd"] + got["bwd"]
    res = flops.expert_adaln_residual_bytes(1, 4, 8, 2, itemsize=4)
    assert res["fwd"] == 4 * (2 * 32 + 3 * 16 + 2 * 8 + 2 * 32)     # x, y, gate/shift/scale, w, b -> x_new, out
    assert flops.rope3d_bytes(1, 3, 2, 4, itemsize=2)["fwd"] == 2 * (24 + 4 + 4 + 24)
    pad = flops.causal_pad3d_bytes(1, 2, 3, 4, 5, kernel_t=3, pad_hw=(1, 1), itemsize=2)
    assert pad["fwd"] == 2 * (120 + 2 * 5 * 6 * 7 + 2 * 2 * 4 * 5)   # x -> out (T+2, H+2, W+2) + cache
    assert pad["bwd"] == 2 * (5 * 2 * 4 * 5 + 120)                  # d_out's interior -> d_x
    assert flops.rope3d_bytes(1, 3, 2, 4, itemsize=2)["bwd"] == 2 * ((24 + 24 + 4) + (24 + 4 + 4))
    gn = flops.group_norm_silu_pad_bytes(1, 2, 3, 4, 5, zq=True, itemsize=2)
    gn0 = flops.group_norm_silu_pad_bytes(1, 2, 3, 4, 5, zq=False, itemsize=2)
    assert gn["fwd"] - gn0["fwd"] == 2 * 2 * 120                    # zq_scale and zq_shift read once
    assert gn0["fwd"] - pad["fwd"] == 2 * (120 + 2 * 2)             # x read twice (statistics, normalize) + w, b
    assert gn["bwd"] - gn0["bwd"] == 2 * (2 * 2 * 120 + 2 * 120)    # zq read twice, their grads written
    fits = flops.group_norm_silu_pad_bytes(1, 2, 3, 4, 5, zq=True, itemsize=2, fits=True)
    assert gn["fwd"] - fits["fwd"] == 2 * 120                       # a group on chip: x read once
    assert gn["bwd"] - fits["bwd"] == 2 * (5 * 2 * 4 * 5 + 120 + 2 * 120)   # d_out's interior, x, zq read once


def test_vae_flops_match_torch_flop_counter_on_diffusers_vae():
    diffusers = pytest.importorskip("diffusers", reason="diffusers (the test extra) is the oracle")
    import dataclasses

    from torch.utils.flop_counter import FlopCounterMode

    from cogvideox.config import VAEConfig
    cfg = VAEConfig.preset("tiny")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLCogVideoX(**dataclasses.asdict(cfg)).eval()
    # odd and even latent counts (decode chunks 3, 2 / 2, 2), 9 and 12 frames (encode chunks 9 / 12), batch 2
    c = cfg.latent_channels
    for kind, shape in (("decode", (1, c, 5, 4, 6)), ("decode", (2, c, 4, 2, 4)), ("encode", (1, 3, 9, 16, 24)),
                        ("encode", (2, 3, 12, 16, 16))):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            x = torch.randn(*shape)
            vae.encode(x) if kind == "encode" else vae.decode(x)
        assert flops.vae_flops(cfg, kind, shape) == counter.get_total_flops(), (kind, shape)
    assert flops.conv_flops(2, 3, 27, 10) == 2 * 2 * 3 * 27 * 10
    with pytest.raises(ValueError):
        flops.vae_flops(cfg, "roundtrip", (1, 3, 9, 16, 16))


# ---- telemetry -------------------------------------------------------------------------------------------------

def test_telemetry_records_why_it_is_absent_on_cpu():
    t = Telemetry(CPU)
    assert not t.available and "GPU" in t.reason
    with t.during("kernels"):
        pass
    d = t.as_dict()
    assert d["available"] is False and d["suites"]["kernels"]["reason"] == t.reason


def test_telemetry_summary_flags_throttling():
    assert decode_reasons(0x1 | 0x40) == ["gpu_idle", "hw_thermal_slowdown"]
    calm = [{"sm_clock_mhz": 1980, "power_w": 500.0, "temp_c": 60, "mem_clock_mhz": 2619, "throttle_mask": 0x1}]
    s = summarize(calm)
    assert not s["throttled"] and s["throttle_reasons"] == ["gpu_idle"] and s["sm_clock_mhz"]["max"] == 1980
    hot = calm + [{"sm_clock_mhz": 1500, "power_w": 700.0, "temp_c": 85, "mem_clock_mhz": 2619,
                   "throttle_mask": 0x4}]
    s = summarize(hot)
    assert s["throttled"] and "sw_power_cap" in s["throttle_reasons"]
    assert s["sm_clock_mhz"]["min"] == 1500 and s["power_w"]["mean"] == 600.0
    assert summarize([]) == {"samples": 0, "throttled": False, "throttle_reasons": []}


# ---- runner: skips, errors, fit check --------------------------------------------------------------------------

def _ctx(**kw):
    return Context(device=CPU, size="small", dtype=torch.float32, budget_s=0.01, compile=False, **kw)


def _toy_suite():
    def cases(ctx):
        def build():
            def missing():
                raise ImportError("no module named flash_attn")

            def broken():
                raise RuntimeError("boom")
            x = torch.randn(64)
            return [Variant("ok", lambda: (lambda: x * 2), bytes=x.numel() * 8),
                    Variant("missing", missing), Variant("broken", broken),
                    Variant("declined", None, skip="needs a CUDA device")]
        return [Case("toy", {"n": 64}, build), Case("huge", {"n": 1}, build, est_bytes=1 << 62)]
    return Suite("toy", "toy", cases)


def test_runner_reports_skips_errors_and_what_does_not_fit():
    ctx = _ctx()
    (p,) = plan([_toy_suite()], ctx)
    assert "does not fit" in p.cases[1].skip
    rows, summary = run_planned(p, ctx, progress=lambda line: None)
    by = {(r["case"], r["impl"]): r for r in rows}
    assert by[("toy", "ok")]["status"] == "ok" and by[("toy", "ok")]["gbps"] > 0
    assert by[("toy", "missing")]["status"] == "skipped" and "flash_attn" in by[("toy", "missing")]["reason"]
    assert by[("toy", "broken")]["status"] == "error" and "boom" in by[("toy", "broken")]["reason"]
    assert by[("toy", "declined")]["reason"] == "needs a CUDA device"
    assert by[("huge", "*")]["status"] == "skipped"
    assert summary["status"] == "partial"
    with pytest.raises(BenchArgumentError, match="do not fit"):
        plan([_toy_suite()], _ctx(size_requested=True))


def test_suite_that_cannot_run_is_skipped_with_reason():
    def cases(ctx):
        raise SuiteSkipped("cogvideox.vae is not importable: no module")
    ctx = _ctx()
    (p,) = plan([Suite("vae", "x", cases)], ctx)
    rows, summary = run_planned(p, ctx, progress=lambda line: None)
    assert rows == [] and summary["status"] == "skipped" and "not importable" in summary["reason"]


# ---- CLI: bad arguments fail before anything runs --------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["nosuch"], "unknown suite"),
    (["--suites", "kernels,nosuch"], "unknown suite"),
    (["--size", "full", "kernels"], "need a CUDA GPU"),
    (["--models", "7b", "kernels"], "unknown model size"),
    (["--budget", "0", "kernels"], "--budget"),
    (["--against", "x.json"], "--against needs --compare"),
    (["kernels", "--filter", "no-such-case"], "matches no case"),
    (["--threads", "0", "kernels"], "--threads"),
])
def test_bad_arguments_error_before_running(argv, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(argv + ["--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_list_names_every_suite(capsys):
    assert main(["--list"]) == 0
    text = capsys.readouterr().out
    for name in ("kernels", "attention", "model", "vae", "e2e", "parallel", "vae_parallel"):
        assert name in text


# ---- schema, report, plots, compare (synthetic results: fast and exact) ----------------------------------------

def _row(suite, case, impl, p, ms, **kw):
    row = {"suite": suite, "case": case, "impl": impl, "pass": p, "status": "ok", "reason": None,
           "device": "NVIDIA H100 80GB HBM3", "device_type": "cuda", "dtype": "bfloat16", "size": "full",
           "shape": {"S": 17776}, "backend": None, "flops": None, "bytes": None, "paper": None, "extra": {},
           "median_ms": ms, "p20_ms": 0.9 * ms, "p80_ms": 1.1 * ms, "min_ms": 0.8 * ms, "max_ms": 1.2 * ms,
           "reps": 10, "tflops": None, "gbps": None, "ceiling": None, "pct_of_ceiling": None,
           "peak_mem_bytes": 3 << 30, "peak_mem_kind": "cuda max_memory_allocated"}
    row.update(kw)
    return row


def _doc():
    rows = [_row("kernels", "expert_adaln 5b", impl, "fwd", ms, gbps=g, ceiling="copy", pct_of_ceiling=g / 30)
            for impl, ms, g in (("eager", 1.0, 900.0), ("compile", 0.5, 1800.0), ("ours", 0.4, 2250.0))]
    for layout, secs in (("3d", (0.5, 2.5, 11.0)), ("2d+1d", (0.45, 1.4, 4.5))):
        for res, sec, seq in zip(("256x384x6s", "480x720x6s", "768x1360x5s"), secs, (5218, 17776, 45106)):
            rows.append(_row("attention", f"step 5b {layout} {res}", "ours", "step", sec * 1e3,
                             extra={"resolution": res, "model": "5b", "layout": layout, "seq_len": seq},
                             paper={"table8_h800_s": paper.TABLE8_SECONDS[layout][res]}))
    rows.append(_row("e2e", "e2e 5b 480x720x6s", "ours", "generate", 100e3,
                     extra={"model": "5b", "resolution": "480x720x6s", "transformer_s": 90.0, "vae_s": 8.0,
                            "scheduler_s": 2.0},
                     paper={"table7_h800_s": 113, "table7_h800_gb": 26, "official_h100_s": 90}))
    rows.append({**_row("attention", "attention-op 5b", "flash-attn-3", "fwd", 1.0), "status": "skipped",
                 "reason": "package flash-attn 3 is not installed"})
    return {"schema_version": results.SCHEMA_VERSION, "created": "2026-11-22T00:00:00+00:00", "argv": [],
            "size": "full", "dtype": "bfloat16",
            "device": {"type": "cuda", "name": "NVIDIA H100 80GB HBM3"},
            "environment": {"torch": "2.11", "triton": "3.6", "cuda": "13.0", "driver": "580.1",
                            "git": {"commit": "abc", "dirty": False}},
            "ceilings": {"copy_gbps": 3000.0, "matmul_tflops": 790.0, "copy_bytes": 1 << 30, "matmul_n": 8192,
                         "matmul_dtype": "bfloat16"},
            "telemetry": {"available": True, "reason": None, "static": {"name": "H100", "driver": "580.1"},
                          "suites": {"kernels": {"samples": 3, "throttled": True,
                                                 "throttle_reasons": ["hw_thermal_slowdown"]}}},
            "suites": {"kernels": {"status": "ok", "reason": None, "notes": []},
                       "attention": {"status": "partial", "reason": None, "notes": []},
                       "e2e": {"status": "ok", "reason": None, "notes": []}},
            "rows": rows}


def test_schema_accepts_a_run_and_names_what_is_wrong():
    doc = _doc()
    results.validate(doc)
    for breakage, message in [
        (lambda d: d.pop("ceilings"), "ceilings"),
        (lambda d: d["rows"][0].pop("dtype"), "dtype"),
        (lambda d: d["rows"][0].update(status="fine"), "status"),
        (lambda d: d["rows"][0].update(median_ms=0.0), "non-positive"),
        (lambda d: d["rows"][-1].update(reason=None), "without a reason"),
        (lambda d: d["environment"].pop("driver"), "driver"),
        (lambda d: d.update(schema_version=99), "schema_version"),
    ]:
        bad = copy.deepcopy(doc)
        breakage(bad)
        with pytest.raises(results.SchemaError, match=message):
            results.validate(bad)


def test_report_tables_and_plots(tmp_path):
    doc = _doc()
    path = report.write(doc, str(tmp_path))
    text = open(path).read()
    assert "THROTTLING seen during: kernels" in text
    # Table 8 beside ours: 5B 480x720 ours 2.5 s (3D) / 1.4 s (2D+1D) = 1.79; paper 2.11 / 1.26 = 1.67
    line = next(li for li in text.splitlines() if li.startswith("| 480x720x6s | 5b"))
    assert "| 1.400 | 2.500 | 1.79 | 1.26 | 2.11 | 1.67 |" in line
    assert "| 113 / 26 | 90 |" in text                      # Table 7 and the official H100 time
    assert "flash-attn-3: skipped: package flash-attn 3 is not installed" in text
    pytest.importorskip("matplotlib", reason="plots need matplotlib")
    for png in ("dit_step_vs_seq.png", "kernels_pct_of_ceiling.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"![{png}]({png})" in text


def test_report_without_matplotlib_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # import matplotlib now raises ImportError
    text = open(report.write(_doc(), str(tmp_path))).read()
    assert "Plots skipped: matplotlib is not installed" in text
    assert not list(tmp_path.glob("*.png"))


def test_compare_pairs_rows_and_reports_ratios(tmp_path, capsys):
    old, new = _doc(), _doc()
    for r in new["rows"]:
        if r["status"] == "ok" and r["impl"] == "ours" and r["suite"] == "kernels":
            r["median_ms"] = 0.2                              # twice as fast as before
    new["rows"].append(_row("kernels", "rope3d 5b", "ours", "fwd", 0.3))   # only in the new run
    pairs, warnings = results.compare(old, new)
    ours = next(p for p in pairs if p["impl"] == "ours" and p["suite"] == "kernels")
    assert ours["ratio"] == pytest.approx(0.5) and ours["speedup"] == pytest.approx(2.0)
    same = next(p for p in pairs if p["impl"] == "eager")
    assert same["ratio"] == pytest.approx(1.0)
    assert any("no counterpart in the old" in w for w in warnings)
    a, b = tmp_path / "old.json", tmp_path / "new.json"
    results.dump(old, str(a))
    results.dump(new, str(b))
    assert main(["--compare", str(a), "--against", str(b)]) == 0
    out = capsys.readouterr().out
    assert "| kernels | expert_adaln 5b | ours | fwd | 0.400 | 0.200 | 0.500 | 2.00x |" in out


def test_readme_results_script(tmp_path):
    results.dump(_doc(), str(tmp_path / "h100.json"))
    script = os.path.join(ROOT, "scripts", "readme_results.py")
    out = subprocess.run([sys.executable, script, "--results-dir", str(tmp_path)], capture_output=True, text=True,
                         check=True).stdout
    assert "NVIDIA H100 80GB HBM3" in out and "| expert_adaln 5b | fwd | 1.000 | 0.500 | 0.400 |" in out
    assert "1.25x" in out                                  # best baseline 0.5 ms / ours 0.4 ms
    readme = tmp_path / "README.md"
    readme.write_text("# title\nkeep\n<!-- results:start -->\nold\n<!-- results:end -->\ntail\n")
    subprocess.run([sys.executable, script, "--results-dir", str(tmp_path), "--readme", str(readme), "--write"],
                   check=True, capture_output=True)
    text = readme.read_text()
    assert text.startswith("# title\nkeep\n<!-- results:start -->\n") and text.endswith("<!-- results:end -->\ntail\n")
    assert "old" not in text and "expert_adaln 5b" in text
    readme.write_text("no markers\n")
    r = subprocess.run([sys.executable, script, "--results-dir", str(tmp_path), "--readme", str(readme), "--write"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and readme.read_text() == "no markers\n" and "results:start" in r.stderr



def test_readme_results_script_without_ceilings(tmp_path):
    """A run whose ceilings failed (results.json "ceilings": {"error": ...}) still renders, and says so."""
    doc = _doc()
    doc["ceilings"] = {"error": "CUDA out of memory"}
    for r in doc["rows"]:
        r["pct_of_ceiling"] = None
    results.dump(doc, str(tmp_path / "h100.json"))
    script = os.path.join(ROOT, "scripts", "readme_results.py")
    r = subprocess.run([sys.executable, script, "--results-dir", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Ceilings could not be measured (CUDA out of memory)" in r.stdout and "expert_adaln 5b" in r.stdout

# ---- a real CPU run of every suite at tiny shapes --------------------------------------------------------------

@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["--out", str(out), "--budget", "0.01", "--threads", "1"]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_cpu_run_of_every_suite(cpu_run):
    out, doc = cpu_run
    results.validate(doc)
    assert set(doc["suites"]) == {"kernels", "attention", "model", "vae", "e2e", "train", "parallel",
                                 "vae_parallel"}
    assert doc["device"]["type"] == "cpu" and doc["size"] == "small"
    assert doc["ceilings"]["copy_gbps"] > 0 and doc["ceilings"]["matmul_tflops"] > 0
    assert doc["environment"]["git"]["commit"] and doc["telemetry"]["reason"]
    errors = [f"{r['case']} {r['impl']} {r['pass']}: {r['reason']}" for r in doc["rows"] if r["status"] == "error"]
    assert not errors, errors
    for name, s in doc["suites"].items():
        assert s["status"] in ("ok", "partial", "skipped"), name
        if s["status"] == "skipped":
            assert s["reason"], name                      # a suite that cannot run says why
        else:
            assert any(r["status"] == "ok" for r in doc["rows"] if r["suite"] == name), name
    for r in doc["rows"]:
        assert r["status"] == "ok" or r["reason"]
        if r["status"] == "ok":
            assert r["device"] == "cpu" and r["dtype"] == "float32" and r["shape"] and r["median_ms"] > 0
            assert r["pct_of_ceiling"] is None and r["peak_mem_bytes"] is None   # no ceiling, no peak at small CPU
        if r["status"] == "ok" and r["suite"] == "e2e":
            e = r["extra"]
            assert e["transformer_s"] + e["vae_s"] + e["scheduler_s"] <= r["median_ms"] / 1e3, r
    text = (out / "report.md").read_text()
    assert "GPU rows were not run" in text
    assert "| 113 / 26 |" not in text           # the paper's numbers are never put beside small shapes
    assert "| resolution | model | tokens |" in text or doc["suites"]["attention"]["status"] == "skipped"


def test_cpu_run_compares_against_itself(cpu_run, tmp_path, capsys):
    out, doc = cpu_run
    assert main(["kernels", "--filter", "causal_pad3d", "--out", str(tmp_path), "--budget", "0.01",
                 "--compare", str(out / "results.json")]) == 0
    text = (tmp_path / "compare.md").read_text()
    assert "| kernels | causal_pad3d vae 1x32x5x24x36 | eager | fwd |" in text


def test_compile_rows_run_when_asked(tmp_path):
    """torch.compile rows are off by default on a CPU (minutes of compiling); --compile runs them."""
    assert main(["kernels", "--filter", "causal_pad3d", "--compile", "--out", str(tmp_path), "--budget", "0.01",
                 "--no-plots"]) == 0
    doc = results.load(str(tmp_path / "results.json"))
    comp = [r for r in doc["rows"] if r["impl"] == "compile"]
    assert {r["pass"] for r in comp} == {"fwd", "bwd", "fwd+bwd"}
    assert all(r["status"] == "ok" for r in comp), [r["reason"] for r in comp]


# ---- CUDA-only paths, exercised on a CPU with torch.cuda / pynvml replaced by fakes ------------------------------

class _FakeEvent:
    """torch.cuda.Event stand-in: record() logs itself and takes a host timestamp; elapsed_time in ms."""
    log: list = []

    def __init__(self, enable_timing=False):
        assert enable_timing, "CUDA events need enable_timing=True to be timed"
        self.t = None

    def record(self, stream=None):
        import time
        self.t = time.perf_counter()
        _FakeEvent.log.append("record")

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


def test_measure_cuda_path_flushes_outside_events_and_excludes_the_flush_buffer(monkeypatch):
    import contextlib

    from bench import harness
    cuda0 = torch.device("cuda", 0)
    log, peak = [], {"alloc": 0}
    _FakeEvent.log = log

    class Flush:                                     # the 256 MB buffer, here a logging stand-in of 4 KiB
        def numel(self):
            return 1024

        def element_size(self):
            return 4

        def zero_(self):
            log.append("flush")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: log.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peak["alloc"])
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(harness, "_L2_FLUSH", {})

    def fn():
        log.append("fn")
        peak["alloc"] = 5000 + harness._l2_flush_bytes(cuda0)   # the case's own 5000 B + the flush buffer

    monkeypatch.setattr(harness, "_l2_flush_buffer", lambda d: harness._L2_FLUSH.setdefault(harness._flush_key(d),
                                                                                              Flush()))
    t, nbytes, kind = measure(fn, cuda0, budget_s=0.0, min_reps=3, max_reps=3, warmup=1)
    assert kind == "cuda max_memory_allocated" and t.reps == 3 and nbytes == 5000
    timed = log[log.index("flush"):]
    # every repetition: flush, then the events around fn alone (the flush's time is outside them); one sync at the end
    assert timed == ["flush", "record", "fn", "record"] * 3 + ["sync"]
    # the measuring call: peak reset after a sync, fn between two syncs
    assert log[:log.index("flush")] == ["fn", "sync", "reset", "sync", "fn", "sync", "sync"]
    log.clear()
    _, nbytes, _ = measure(fn, cuda0, budget_s=0.0, min_reps=1, max_reps=1, warmup=0)
    assert nbytes == 5000            # the flush buffer, alive now before the block, is still not counted


class _NVMLError(Exception):
    pass


class _FakeNVML:
    """pynvml stand-in: a pre-535 driver (the clock-event-reasons symbol is missing), a GPU hitting HW slowdown."""
    NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 1, 2, 0

    def __init__(self):
        self.bus_ids = []

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByPciBusId(self, bus):
        self.bus_ids.append(bus)
        return "h"

    def nvmlDeviceGetHandleByIndex(self, i):
        return "h"

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlSystemGetDriverVersion(self):
        return "530.30"

    def nvmlDeviceGetMemoryInfo(self, h):
        return type("M", (), {"total": 80 << 30, "used": 1 << 30})()

    def nvmlDeviceGetMaxClockInfo(self, h, kind):
        return 1980

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return 700_000                      # mW

    def nvmlSystemGetCudaDriverVersion(self):
        return 12010

    def nvmlDeviceGetClockInfo(self, h, kind):
        return 1755

    def nvmlDeviceGetPowerUsage(self, h):
        return 650_000                      # mW

    def nvmlDeviceGetTemperature(self, h, kind):
        return 71

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        raise _NVMLError("Function Not Found")

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h):
        return 0x1 | 0x8


def test_telemetry_on_a_fake_gpu_samples_units_and_falls_back_for_throttle_reasons(monkeypatch):
    import types

    from bench import telemetry as tel
    fake = _FakeNVML()
    monkeypatch.setattr(tel, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(
        pci_bus_id=0x19, pci_domain_id=0, pci_device_id=0))
    t = Telemetry(torch.device("cuda", 0), interval_s=0.005)
    assert t.available and t.reason is None and fake.bus_ids == ["00000000:19:00.0"]
    assert t.static["power_limit_w"] == 700.0 and t.static["name"] == "NVIDIA H100 80GB HBM3"
    assert t.driver() == "530.30"
    import time
    with t.during("model"):
        time.sleep(0.05)
    s = t.as_dict()["suites"]["model"]
    assert s["samples"] >= 2 and s["power_w"]["max"] == 650.0 and s["sm_clock_mhz"]["min"] == 1755
    assert s["throttled"] and s["throttle_reasons"] == ["gpu_idle", "hw_slowdown"] and s["throttle_unread"] == 0
    # neither query works: the samples say the reasons are unknown instead of reporting "not throttled"
    monkeypatch.setattr(fake, "nvmlDeviceGetCurrentClocksThrottleReasons", fake.nvmlDeviceGetCurrentClocksEventReasons)
    t2 = Telemetry(torch.device("cuda", 0), interval_s=0.005)
    summ = summarize([t2.sample(), t2.sample()])
    assert summ["throttle_unread"] == 2 and not summ["throttled"]


def test_failed_row_frees_its_model_before_release(monkeypatch):
    """An OOM'd row must not keep its model alive into release() (empty_cache could free nothing), neither when
    building fails nor when the timed call fails."""
    import weakref

    from bench import runner

    class Model:
        pass
    refs, alive_at_release = [], []
    monkeypatch.setattr(runner, "release", lambda device: alive_at_release.append([r() is not None for r in refs]))

    def oom_in_call():
        m = Model()
        refs.append(weakref.ref(m))

        def step():
            big = m                  # noqa: F841 -- a frame of the traceback holds the model
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return step

    def oom_in_build():
        m = Model()
        refs.append(weakref.ref(m))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    case = Case("c", {}, None)
    for make in (oom_in_call, oom_in_build):
        row = runner.run_variant("s", case, Variant("x", make), _ctx())
        assert row["status"] == "error" and row["reason"].startswith("out of memory")
    assert alive_at_release == [[False], [False, False]]


def test_diffusers_vae_falls_back_to_tiling_after_oom_with_the_failed_call_freed(monkeypatch):
    import weakref

    from diffusers import AutoencoderKLCogVideoX

    from bench.suites import vae as vae_suite
    pytest.importorskip("cogvideox.vae")
    refs, freed_before_tiling = [], []
    real_decode, real_tiling = AutoencoderKLCogVideoX._decode, AutoencoderKLCogVideoX.enable_tiling

    def decode(self, z, return_dict=True):
        if not self.use_tiling:
            activations = torch.empty(16)       # what the failed untiled call had allocated
            refs.append(weakref.ref(activations))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 30.00 GiB")
        return real_decode(self, z, return_dict)

    def enable_tiling(self, *a, **k):
        freed_before_tiling.append(all(r() is None for r in refs))
        return real_tiling(self, *a, **k)
    monkeypatch.setattr(AutoencoderKLCogVideoX, "_decode", decode)
    monkeypatch.setattr(AutoencoderKLCogVideoX, "enable_tiling", enable_tiling)
    ctx = _ctx()
    case = vae_suite._case("decode 480x720 13 latents", ctx)
    (theirs,) = [v for v in case.build() if v.impl == "diffusers"]
    run = theirs.make()
    first = run()
    assert theirs.collect() == {"tiled": True} and freed_before_tiling == [True] and len(refs) == 1
    second = run()                               # later calls go straight to the tiled path
    assert len(refs) == 1 and first.shape == second.shape


def test_release_synchronizes_before_emptying_the_cache(monkeypatch):
    from bench import harness
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    harness.release(torch.device("cuda", 0))
    assert calls == ["sync", "empty_cache"]
    calls.clear()
    harness.release(CPU)
    assert calls == []


def test_report_renders_a_gpu_run(cpu_run, tmp_path):
    """The report's GPU-only parts (NVML telemetry, throttling, unreadable reasons) render from a GPU-shaped doc."""
    _, doc = cpu_run
    doc = copy.deepcopy(doc)
    doc["device"] = {"type": "cuda", "index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_bytes": 80 << 30,
                     "capability": "sm_90", "multiprocessors": 132}
    summ = summarize([{"sm_clock_mhz": 1500, "power_w": 690.0, "temp_c": 80, "throttle_mask": 0x4},
                      {"sm_clock_mhz": 1980, "power_w": 400.0, "temp_c": 70, "throttle_mask": None}])
    doc["telemetry"] = {"available": True, "reason": None, "interval_s": 0.1,
                        "static": {"name": "NVIDIA H100 80GB HBM3", "driver": "580.65", "power_limit_w": 700.0,
                                   "max_sm_clock_mhz": 1980},
                        "suites": {name: summ for name in doc["suites"]}}
    doc["cpu_note"] = None
    results.validate(doc)
    text = open(report.write(doc, str(tmp_path), plots=False)).read()
    assert "telemetry (NVML): NVIDIA H100 80GB HBM3, driver 580.65, power limit 700 W" in text
    assert "THROTTLING seen during" in text and "sw_power_cap" in text
    assert "reasons unreadable in 1 of 2 samples" in text and "GPU rows were not run" not in text


def test_run_case_frees_a_model_its_variants_share_before_release(monkeypatch):
    import weakref

    from bench import runner

    class Model:
        pass
    refs, alive_at_release = [], []
    monkeypatch.setattr(runner, "release", lambda device: alive_at_release.append(refs[0]() is not None))

    def build():
        holder = {"model": Model()}          # as the attention suite: one model per case, every variant uses it
        refs.append(weakref.ref(holder["model"]))
        return [Variant(f"v{i}", lambda: (lambda: holder["model"]), min_reps=1, max_reps=1, warmup=0)
                for i in range(2)]
    rows = runner.run_case("s", Case("c", {}, build), _ctx(), progress=lambda line: None)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    # after each variant (the case still holds it), then gone by the case's own release
    assert alive_at_release == [True, True, False]


def test_a_failed_ceiling_measurement_does_not_abort_the_run(monkeypatch, tmp_path):
    from bench import harness

    def fail(device, budget_s=1.0):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
    monkeypatch.setattr(harness, "measure_ceilings", fail)
    assert main(["kernels", "--filter", "causal_pad3d", "--out", str(tmp_path), "--budget", "0.01",
                 "--no-plots"]) == 0
    doc = results.load(str(tmp_path / "results.json"))
    assert "out of memory" in doc["ceilings"]["error"]
    ok = [r for r in doc["rows"] if r["status"] == "ok"]
    assert ok and all(r["pct_of_ceiling"] is None and r["gbps"] > 0 for r in ok)
    assert "ceilings: not measured" in (tmp_path / "report.md").read_text()
