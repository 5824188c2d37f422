#!/usr/bin/env bash
# One short GPU window, one command: scripts/gpu_check.sh [--dry-run] OUT_DIR
#
# Runs, each part under its own `timeout` (seconds in PARTS below, 430 s in all, so results.json is written in
# under eight minutes even when every part runs out its time):
#   setup        diffusers from the carried wheels in .whl/ when it is not importable; versions of everything
#   kernel-tests the kernel parity tests on CUDA with the real compiler: TRITON_INTERPRET unset (triton 3.6's
#                interpreter fails with numpy >= 2.4, triton-lang/triton#9171) and COGVIDEOX_TEST_DEVICE=cuda,
#                which tests/conftest.py turns into CUDA default tensors and the Triton path
#   kernels      python -m bench kernels at the CogVideoX-2B / -5B and VAE shapes (eager, ours; no compile rows:
#                compiling 27 graphs does not fit the window)
#   attention    Table 8: one DiT step (2B, 3d and 2d+1d attention) at the paper's three shapes
#   model        one CogVideoX-5B DiT step, ours vs diffusers
#   vae          one VAE decode of 13 latents at 480 x 720, ours vs diffusers
# A part that needs a missing package (diffusers, flash-attn, xformers) reports skipped rows with the reason (the
# bench does that); results.json lists which packages were present.
# --dry-run: print what would run and the time allotted to each part, run nothing, exit 0 (any machine).
# GPU_CHECK_PARTS=kernels,vae runs only those parts (a rerun of what failed, in what is left of the window).
set -u
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ $# -ne 1 ]; then echo "usage: $0 [--dry-run] OUT_DIR" >&2; exit 2; fi
OUT=$1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
KERNEL_TESTS="tests/test_causal_pad3d.py tests/test_group_norm_silu_pad.py tests/test_expert_adaln.py tests/test_rope3d.py"

# name|seconds|command
PARTS=(
  "setup|15|if [ -d .whl ] && ! $PY -c 'import diffusers' 2>/dev/null; then $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site .whl/*.whl; fi; $PY -c 'import torch, triton, numpy; print(torch.__version__, triton.__version__, numpy.__version__, torch.cuda.get_device_name(0))'"
  "kernel-tests|120|env -u TRITON_INTERPRET COGVIDEOX_TEST_DEVICE=cuda $PY -m pytest $KERNEL_TESTS -q -p no:cacheprovider --junitxml=\$OUT/kernel-tests.xml"
  "kernels|60|$PY -m bench kernels --models 2b,5b --no-compile --budget 0.2 --no-plots --out \$OUT/kernels"
  "attention|60|$PY -m bench attention --models 2b --filter step --no-compile --budget 0.2 --no-plots --out \$OUT/attention"
  "model|75|$PY -m bench model --models 5b --no-compile --budget 1 --no-plots --out \$OUT/model"
  "vae|100|$PY -m bench vae --filter 'decode 480x720' --budget 1 --no-plots --out \$OUT/vae"
)

if [ -n "${GPU_CHECK_PARTS:-}" ]; then
  chosen=()
  for p in "${PARTS[@]}"; do
    case ",$GPU_CHECK_PARTS," in *",${p%%|*},"*) chosen+=("$p");; esac
  done
  PARTS=("${chosen[@]}")
fi
total=0
for p in "${PARTS[@]}"; do total=$((total + $(echo "$p" | cut -d'|' -f2))); done
if [ $DRY -eq 1 ]; then
  echo "gpu_check dry run: OUT_DIR=$OUT, $total s allotted in all"
  for p in "${PARTS[@]}"; do
    IFS='|' read -r name secs cmd <<< "$p"
    echo "  [$name] ${secs}s: ${cmd//\$OUT/$OUT}"
  done
  exit 0
fi

mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
export OUT
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}     # this checkout, not an installed copy
: > "$OUT/parts.jsonl"
for p in "${PARTS[@]}"; do
  IFS='|' read -r name secs cmd <<< "$p"
  if [ "$name" != "setup" ] && [ -d /tmp/gpu_check_site ]; then   # the wheels setup installed
    export PYTHONPATH=/tmp/gpu_check_site:$ROOT
  fi
  echo "[$name] ${secs}s" >&2
  start=$(date +%s.%N)
  timeout --kill-after=5 "$secs" bash -c "$cmd" > "$OUT/$name.log" 2>&1
  rc=$?
  end=$(date +%s.%N)
  $PY - "$name" "$secs" "$rc" "$start" "$end" "$cmd" >> "$OUT/parts.jsonl" <<'PYEOF'
import json, sys
name, secs, rc, start, end, cmd = sys.argv[1:]
print(json.dumps({"part": name, "allotted_s": int(secs), "rc": int(rc), "timed_out": int(rc) in (124, 137),
                  "wall_s": round(float(end) - float(start), 1), "command": cmd}))
PYEOF
done

$PY - "$OUT" <<'PYEOF'
import importlib.util, json, os, sys, xml.etree.ElementTree as ET
out = sys.argv[1]
parts = [json.loads(line) for line in open(os.path.join(out, "parts.jsonl"))]
for p in parts:
    log = os.path.join(out, p["part"] + ".log")
    p["log_tail"] = open(log, errors="replace").read()[-3000:] if os.path.exists(log) else ""
    res = os.path.join(out, p["part"], "results.json")
    if os.path.exists(res):
        p["results"] = json.load(open(res))
    elif p["part"] in ("kernels", "attention", "model", "vae"):
        p["results"] = None
        p["missing"] = "no results.json: the run failed or ran out of its time (see log_tail)"
junit = os.path.join(out, "kernel-tests.xml")
if os.path.exists(junit):
    suite = ET.parse(junit).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    failed = [f"{c.get('classname')}::{c.get('name')}: {(c.find('failure') if c.find('failure') is not None else c.find('error')).get('message', '')[:300]}"
              for c in suite.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
    next(p for p in parts if p["part"] == "kernel-tests")["tests"] = {
        k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} | {"failed": failed}
packages = {m: importlib.util.find_spec(m) is not None for m in ("diffusers", "flash_attn", "xformers")}
doc = {"script": "scripts/gpu_check.sh", "packages_present": packages, "parts": parts}
json.dump(doc, open(os.path.join(out, "results.json"), "w"), indent=1, default=str)
print("wrote", os.path.join(out, "results.json"))
PYEOF
