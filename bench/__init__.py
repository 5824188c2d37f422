"""Benchmarks for cogvideox-kernels: `python -m bench` (see bench/cli.py), one harness (harness.py, runner.py), one
result schema (results.py), FLOP and byte formulas (flops.py), and suites as small files (suites/)."""
