"""pytest configuration for the benchmark files in bench/ (tests/ never collects them: `pytest tests`)."""
import os

# Triton 3.9 warns when this is unset and its default changes in 3.10 (../shared/reference/kernel-notes.md).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def pytest_configure(config):
    import torch
    if not torch.cuda.is_available():
        torch.set_num_threads(1)   # as `python -m bench` on a CPU: see bench.harness.CPU_THREADS_NOTE
