"""scripts/gpu_check.sh --dry-run: what a GPU window would run, each part under its own time limit."""
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_lists_every_part_within_eight_minutes(tmp_path):
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--dry-run", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    parts = dict(re.findall(r"^  \[([\w-]+)\] (\d+)s: ", r.stdout, flags=re.M))
    assert list(parts) == ["setup", "kernel-tests", "kernels", "attention", "model", "vae"]
    total = int(re.search(r"(\d+) s allotted in all", r.stdout).group(1))
    assert total == sum(map(int, parts.values())) <= 450               # results.json within eight minutes
    assert "env -u TRITON_INTERPRET COGVIDEOX_TEST_DEVICE=cuda" in r.stdout   # the real compiler, CUDA tensors
    assert "bench kernels --models 2b,5b" in r.stdout and "decode 480x720" in r.stdout
    assert not (tmp_path / "out").exists()                             # a dry run writes nothing


def test_usage_error():
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh")], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr
