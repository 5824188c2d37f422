"""pytest-benchmark front end to the same suites: `pytest bench/ --benchmark-only` times every variant of every
suite at small shapes with the `benchmark` fixture (CUDA if present, else CPU; torch.compile rows run on a GPU and,
as in a default CPU run, are skipped on a CPU unless BENCH_COMPILE=1). `pytest bench/` without --benchmark-only
runs them too; `--benchmark-disable` runs each once as a smoke test. `python -m bench` is the full tool
(ceilings, telemetry, results.json, report, plots).
"""
from __future__ import annotations

import os

import pytest
import torch

from bench.runner import Context, SuiteSkipped
from bench.suites import SUITES

_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# BENCH_COMPILE=1 / 0 forces the torch.compile rows on / off; by default they run on a GPU only, as python -m bench.
_COMPILE = os.environ.get("BENCH_COMPILE", "1" if _DEVICE.type == "cuda" else "0") == "1"
CTX = Context(device=_DEVICE, size="small", dtype=torch.bfloat16 if _DEVICE.type == "cuda" else torch.float32,
              compile=_COMPILE)


def _params():
    params = []
    for name, suite in SUITES.items():
        try:
            cases = suite.cases(CTX)
        except SuiteSkipped as e:
            params.append(pytest.param(None, None, id=name, marks=pytest.mark.skip(reason=f"{name}: {e}")))
            continue
        for case in cases:
            # Variants are listed at collection (small inputs only; models are built in make(), inside the test).
            for v in case.build():
                label = f"{case.name} {v.label}" if v.label else case.name
                params.append(pytest.param(name, v, id=f"{name}/{label}/{v.impl}/{v.pass_}".replace(" ", "-")))
    return params


@pytest.mark.parametrize("suite, variant", _params())
def test_suite_variant(benchmark, suite, variant):
    if variant.skip:
        pytest.skip(variant.skip)        # an unavailable backend / package / device, with the registry's reason
    try:
        fn = variant.make()
    except ImportError as e:
        pytest.skip(f"optional package missing: {e}")
    benchmark.group = suite
    benchmark.extra_info.update(impl=variant.impl, pass_=variant.pass_, backend=variant.backend,
                                flops=variant.flops, bytes=variant.bytes, device=str(_DEVICE))
    benchmark.pedantic(_synchronized(fn), rounds=5, warmup_rounds=1, iterations=1)


def _synchronized(fn):
    """pytest-benchmark reads a host clock around each call; CUDA work is asynchronous, so without the sync it
    would time the kernel launches, not the kernels."""
    if _DEVICE.type != "cuda":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize(_DEVICE)
        return out
    return call
