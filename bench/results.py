"""The result schema (results.json), its check, and --compare.

results.json = {
  "schema_version": 1, "created": ISO-8601 UTC, "argv": [...], "size": "small" | "full",
  "device": {type, name, memory_bytes, ...}, "environment": {torch, triton, cuda, driver, git: {commit, dirty}, ...},
  "ceilings": {copy_gbps, matmul_tflops, ...}, "telemetry": {available, reason, static, suites: {name: summary}},
  "suites": {name: {status: ok | partial | skipped, reason, notes, wall_s}},
  "rows": [{suite, case, impl, pass, status: ok | skipped | error, reason, device, device_type, dtype, size,
            shape, backend, median_ms, p20_ms, p80_ms, min_ms, max_ms, reps, flops, bytes, tflops, gbps,
            ceiling, pct_of_ceiling, peak_mem_bytes, peak_mem_kind, paper, extra}],
}
"""
from __future__ import annotations

import json

SCHEMA_VERSION = 1
TOP_KEYS = ("schema_version", "created", "device", "environment", "ceilings", "telemetry", "suites", "rows")
ROW_KEYS = ("suite", "case", "impl", "pass", "status", "reason", "device", "dtype", "shape")
OK_ROW_KEYS = ("median_ms", "p20_ms", "p80_ms", "reps", "pct_of_ceiling", "peak_mem_bytes")
ROW_STATUSES = ("ok", "skipped", "error")


class SchemaError(ValueError):
    pass


def validate(doc: dict) -> None:
    """Raise SchemaError naming the first problem; a results.json a later --compare can trust passes."""
    if not isinstance(doc, dict):
        raise SchemaError("results must be a JSON object")
    missing = [k for k in TOP_KEYS if k not in doc]
    if missing:
        raise SchemaError(f"missing top-level keys: {missing}")
    if doc["schema_version"] != SCHEMA_VERSION:
        raise SchemaError(f"schema_version {doc['schema_version']!r}, this code reads {SCHEMA_VERSION}")
    for k in ("commit",):
        if k not in doc["environment"].get("git", {}):
            raise SchemaError(f"environment.git.{k} missing")
    for k in ("torch", "triton", "cuda", "driver"):
        if k not in doc["environment"]:
            raise SchemaError(f"environment.{k} missing")
    for i, row in enumerate(doc["rows"]):
        miss = [k for k in ROW_KEYS if k not in row]
        if miss:
            raise SchemaError(f"row {i} misses {miss}")
        if row["status"] not in ROW_STATUSES:
            raise SchemaError(f"row {i} has status {row['status']!r}")
        if row["status"] == "ok":
            miss = [k for k in OK_ROW_KEYS if k not in row]
            if miss:
                raise SchemaError(f"row {i} ({row['case']} {row['impl']}) misses {miss}")
            if not row["median_ms"] > 0:
                raise SchemaError(f"row {i} has a non-positive time {row['median_ms']}")
        elif not row["reason"]:
            raise SchemaError(f"row {i} is {row['status']} without a reason")
    for name, s in doc["suites"].items():
        if s.get("status") == "skipped" and not s.get("reason"):
            raise SchemaError(f"suite {name} skipped without a reason")


def load(path: str) -> dict:
    """A checked results.json; a file that is not one (not UTF-8, not JSON, the wrong schema) is a SchemaError
    naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SchemaError(f"{path}: not a results.json (not JSON: {e})") from None
    try:
        validate(doc)
    except SchemaError as e:
        raise SchemaError(f"{path}: {e}") from None
    return doc


def dump(doc: dict, path: str) -> None:
    validate(doc)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, default=str)
        f.write("\n")


def row_key(row: dict) -> tuple:
    return (row["suite"], row["case"], row["impl"], row["pass"], json.dumps(row["shape"], sort_keys=True),
            row["dtype"])


def compare(old: dict, new: dict) -> tuple[list[dict], list[str]]:
    """Pair the ok rows of two runs by (suite, case, impl, pass, shape, dtype). Returns (pairs, warnings):
    each pair has old_ms, new_ms, ratio = new / old (below 1: faster now) and speedup = old / new."""
    warnings = []
    if old["device"].get("name") != new["device"].get("name"):
        warnings.append(f"different devices: {old['device'].get('name')} vs {new['device'].get('name')}; "
                        f"ratios compare machines, not code")
    old_rows = {row_key(r): r for r in old["rows"] if r["status"] == "ok"}
    pairs = []
    for r in new["rows"]:
        if r["status"] != "ok":
            continue
        o = old_rows.pop(row_key(r), None)
        if o is None:
            continue
        pairs.append({"suite": r["suite"], "case": r["case"], "impl": r["impl"], "pass": r["pass"],
                      "old_ms": o["median_ms"], "new_ms": r["median_ms"],
                      "ratio": r["median_ms"] / o["median_ms"], "speedup": o["median_ms"] / r["median_ms"]})
    only_new = sum(1 for r in new["rows"] if r["status"] == "ok") - len(pairs)
    if only_new:
        warnings.append(f"{only_new} row(s) of the new run have no counterpart in the old one")
    if old_rows:
        warnings.append(f"{len(old_rows)} row(s) of the old run have no counterpart in the new one")
    return pairs, warnings


def format_compare(pairs: list[dict], warnings: list[str]) -> str:
    lines = [f"warning: {w}" for w in warnings]
    lines += ["| suite | case | impl | pass | old ms | new ms | new/old | speedup |",
              "|---|---|---|---|---:|---:|---:|---:|"]
    for p in pairs:
        lines.append(f"| {p['suite']} | {p['case']} | {p['impl']} | {p['pass']} | {p['old_ms']:.3f} | "
                     f"{p['new_ms']:.3f} | {p['ratio']:.3f} | {p['speedup']:.2f}x |")
    if not pairs:
        lines.append("| (no rows in common) | | | | | | | |")
    return "\n".join(lines)
