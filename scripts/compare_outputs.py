"""Compare the run records of two output folders: a refactoring must not change what the studies measure.

    python scripts/compare_outputs.py /tmp/out_before/tiny /tmp/out_after/tiny [--rtol 1e-6]

Records are matched by (study, technique, scale, seed, dataset); for each pair, every quality value and every
deterministic metric (parameter counts, FLOPs/token, KV bytes, bytes in memory and on disk, nominal bits) must be
equal (floats within --rtol). Timings, memory in use, power and throughput vary run to run and are not compared.
Prints one line per difference and a summary; exits 1 when anything differs or a record exists on one side only.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

DETERMINISTIC = ("params", "active_params", "trainable_params", "flops_per_token", "kv_bytes_per_token",
                 "memory_bytes", "disk_bytes", "nominal_bits", "tokens", "samples")


def records(folder: Path) -> dict[tuple, dict]:
    out = {}
    for path in sorted((folder / "runs").glob("*/*.json")):
        rec = json.loads(path.read_text())
        if rec.get("status") != "ok":
            continue
        p = rec.get("params") or {}
        key = (rec["study"], rec["technique"], rec.get("scale", ""), p.get("seed"), p.get("dataset"))
        if key in out and (out[key].get("started_at") or "") > (rec.get("started_at") or ""):
            continue  # the newest record of an experiment
        out[key] = rec
    return out


def same(a, b, rtol: float) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rtol, abs_tol=0.0)
    return a == b


def compare(before: Path, after: Path, rtol: float) -> list[str]:
    a, b = records(before), records(after)
    diffs = [f"only in {before}: {k}" for k in a if k not in b] + [f"only in {after}: {k}" for k in b if k not in a]
    for key in sorted(set(a) & set(b), key=str):
        ra, rb = a[key], b[key]
        pairs = [("quality", k) for k in set(ra.get("quality", {})) | set(rb.get("quality", {}))]
        pairs += [("metrics", k) for k in DETERMINISTIC if k in ra.get("metrics", {}) or k in rb.get("metrics", {})]
        for section, k in sorted(pairs):
            va, vb = ra.get(section, {}).get(k), rb.get(section, {}).get(k)
            if not same(va, vb, rtol):
                diffs.append(f"{key} {section}.{k}: {va!r} -> {vb!r}")
    return diffs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path, help="outputs/<profile> of the reference code")
    ap.add_argument("after", type=Path, help="outputs/<profile> of the changed code")
    ap.add_argument("--rtol", type=float, default=1e-6, help="relative tolerance for floats")
    args = ap.parse_args(argv)
    for folder in (args.before, args.after):
        if not (folder / "runs").is_dir():
            print(f"error: {folder} has no runs/ folder (pass outputs/<profile>)", file=sys.stderr)
            return 2
    diffs = compare(args.before, args.after, args.rtol)
    n = len(records(args.before))
    print("\n".join(diffs) if diffs else f"{n} records: quality and deterministic metrics equal")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
