"""Compare two bench_train.py JSON reports (a baseline commit and a new one): peak memory and tokens/s.

    python benchmarks/compare_runs.py benchmarks/results/h100-1b-OLD.json benchmarks/results/h100-1b-NEW.json

Rows are matched on (method, length); the two runs must share device, shape and memory options
(checkpointing, offload, tiled MLP, loss), or the comparison says nothing and is refused. Exits
with status 1 when any row's peak memory grew by more than ``--max-memory-growth`` (default 2%),
or ran out of memory where the baseline did not: RESULTS.md's rule is that such a regression
lands only with a line there saying why.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# run settings that change memory or speed: two runs compare only if these agree
SAME_SETTINGS = ("device", "shape", "dtype", "activation_checkpointing", "checkpoint_every", "offload",
                 "tiled_mlp_tokens", "loss", "optimizer", "long_share", "attn_requested")
DEFAULTS = {"checkpoint_every": 1, "tiled_mlp_tokens": 0}  # for reports written before these options


def load(path: str) -> dict:
    report = json.loads(Path(path).read_text())
    if "results" not in report or "meta" not in report:
        raise SystemExit(f"{path}: not a bench_train.py --json report (no 'meta' / 'results').")
    return report


def mismatched_settings(base: dict, new: dict) -> list[str]:
    def setting(report: dict, key: str):
        return report["meta"].get(key, DEFAULTS.get(key))

    return [f"{key}: {setting(base, key)!r} vs {setting(new, key)!r}"
            for key in SAME_SETTINGS if setting(base, key) != setting(new, key)]


def compare(base: dict, new: dict, max_memory_growth: float) -> tuple[list[dict], list[str]]:
    """Rows (method, length, both figures, changes) and the regressions found among them."""
    old_rows = {(r["method"], r["length"]): r for r in base["results"]}
    rows, regressions = [], []
    for r in sorted(new["results"], key=lambda r: (r["length"], r["method"])):
        old = old_rows.get((r["method"], r["length"]))
        if old is None:
            continue
        row = {"method": r["method"], "length": r["length"], "old": old, "new": r, "memory_change": None,
               "speed_change": None}
        if old["status"] == "ok" and r["status"] == "ok":
            row["memory_change"] = r["peak_memory_gib"] / old["peak_memory_gib"] - 1
            row["speed_change"] = r["tokens_per_s"] / old["tokens_per_s"] - 1
            if row["memory_change"] > max_memory_growth:
                regressions.append(
                    f"{r['method']} at {r['length']}: peak memory {old['peak_memory_gib']:.2f} -> "
                    f"{r['peak_memory_gib']:.2f} GiB ({100 * row['memory_change']:+.1f}%)"
                )
        elif old["status"] == "ok" and r["status"] != "ok":
            regressions.append(f"{r['method']} at {r['length']}: {r['status']} (baseline ran)")
        rows.append(row)
    return rows, regressions


def markdown(rows: list[dict]) -> str:
    def figure(r: dict, key: str, pattern: str) -> str:
        return format(r[key], pattern) if r["status"] == "ok" else r["status"]

    def change(value) -> str:
        return "-" if value is None else f"{100 * value:+.1f}%"

    lines = ["| length | method | tokens/s old -> new | change | peak GiB old -> new | change |",
             "|---:|---|---:|---:|---:|---:|"]
    for row in rows:
        old, new = row["old"], row["new"]
        lines.append(
            f"| {row['length']} | {row['method']} | {figure(old, 'tokens_per_s', ',.0f')} -> "
            f"{figure(new, 'tokens_per_s', ',.0f')} | {change(row['speed_change'])} | "
            f"{figure(old, 'peak_memory_gib', '.2f')} -> {figure(new, 'peak_memory_gib', '.2f')} | "
            f"{change(row['memory_change'])} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline", help="bench_train.py --json report of the baseline commit")
    parser.add_argument("new", help="the same command's report on the new commit")
    parser.add_argument("--max-memory-growth", type=float, default=0.02, help="allowed relative growth (0.02 = 2%%)")
    ns = parser.parse_args(argv)
    base, new = load(ns.baseline), load(ns.new)
    mismatched = mismatched_settings(base, new)
    if mismatched:
        print("The runs differ in settings that change memory or speed; rerun with the same command:\n  "
              + "\n  ".join(mismatched), file=sys.stderr)
        return 2
    rows, regressions = compare(base, new, ns.max_memory_growth)
    if not rows:
        print("No (method, length) row is in both reports.", file=sys.stderr)
        return 2
    print(markdown(rows))
    if regressions:
        print("\nPeak-memory regressions (add a line to benchmarks/RESULTS.md saying why, or fix them):")
        print("\n".join(f"  {line}" for line in regressions))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
