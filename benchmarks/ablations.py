"""ProLong's ablations in miniature, on the micro-ProLong demo (`make ablations`).

Each variant runs the demo's CPT (recipes/tiny/micro-cpt.yaml with one change) and SFT
(recipes/tiny/micro-sft.yaml) from the committed base model, then the demo's report (recall from the
evaluation package at the native 256 tokens and at 1K; held-out short-text loss):

    prolong          theta raised (1e4 -> 1.6e5), document masking, 60% long / 40% short
    theta_unchanged  RoPE base left at 1e4
    no_masking       documents of a packed row attend to each other (one span per row, positions run on)
    long_only        100% long data (recall-long + books)

    python benchmarks/ablations.py --data demo_data/micro --out benchmarks/results/ablations [--steps N]

Writes OUT/ablations.md (table + the paper's direction per ablation), OUT/ablations.json and
OUT/ablations.png. Each variant's runs land in OUT/runs/<variant> (not committed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MIXTURE = {"recall-long-1024": 0.35, "books-1024": 0.25, "short-1024": 0.3, "recall-short-1024": 0.1}
LONG_ONLY = {"recall-long-1024": 0.58, "books-1024": 0.42}


def unmasked_copy(src: str, dst: str) -> str:
    """The same packed rows with one span per row: the collator then gives running positions and
    full causal attention across the row's documents (ProLong's "no document masking")."""
    import shutil

    import datasets

    if not os.path.exists(os.path.join(dst, "prolong_data.json")):
        rows = datasets.load_from_disk(src)
        merged = rows.map(lambda row: {"indices": [[0, len(row["input_ids"])]]})
        merged.save_to_disk(dst)
        shutil.copy(os.path.join(src, "prolong_data.json"), dst)
    return dst


def run(command: list[str], log: Path) -> None:
    with open(log, "w") as f:
        result = subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if result.returncode:
        sys.exit(f"failed ({result.returncode}): {' '.join(command)}; see {log}")


def variant_runs(name: str, data: str, out: Path, steps: int | None) -> dict:
    runs = out / "runs" / name
    runs.mkdir(parents=True, exist_ok=True)
    shares, extra = MIXTURE, []
    if name == "theta_unchanged":
        extra = ["--rope_theta", "10000"]
    if name == "long_only":
        shares = LONG_ONLY
    mixture = {os.path.join(data, d): s for d, s in shares.items()}
    if name == "no_masking":
        mixture = {unmasked_copy(p, str(out / "runs" / "unmasked" / Path(p).name)): s for p, s in mixture.items()}
    steps_flag = ["--max_steps", str(steps)] if steps else []
    python = sys.executable
    start = time.time()
    run([python, "prolong/run_cpt.py", "recipes/tiny/micro-cpt.yaml", "--dataset_mixture", json.dumps(mixture),
         "--output_dir", str(runs / "cpt"), "--overwrite_output_dir", "true", "--report_to", "none",
         "--save_strategy", "no", *extra, *steps_flag], runs / "cpt.log")
    run([python, "prolong/run_sft.py", "recipes/tiny/micro-sft.yaml", "--model_name_or_path", str(runs / "cpt"),
         "--output_dir", str(runs / "sft"), "--overwrite_output_dir", "true", "--report_to", "none"], runs / "sft.log")
    from prolong.demo.micro_data import MICRO_FACTOR, MICRO_WINDOW
    from prolong.demo.micro_report import packed_loss, recall_scores

    recall = recall_scores(str(runs / "sft"), str(runs / "eval"), MICRO_WINDOW, MICRO_FACTOR, samples=20)
    loss = packed_loss(str(runs / "sft"), os.path.join(data, f"heldout-short-{MICRO_WINDOW}"))
    return {"variant": name, "recall_native": recall[MICRO_WINDOW], "recall_4x": recall[MICRO_WINDOW * MICRO_FACTOR],
            "short_loss": loss, "seconds": round(time.time() - start)}


def directions(rows: dict) -> list[tuple[str, str, bool]]:
    p = rows["prolong"]
    checks = [("RoPE base raised vs unchanged", "raised theta gives higher recall at 4x",
               p["recall_4x"] > rows["theta_unchanged"]["recall_4x"]),
              ("document masking on vs off", "masking gives higher recall at 4x and no worse short-text loss",
               p["recall_4x"] > rows["no_masking"]["recall_4x"] and p["short_loss"] <= rows["no_masking"]["short_loss"]),
              ("60/40 long/short vs 100% long", "the short data keeps short-text loss lower",
               p["short_loss"] < rows["long_only"]["short_loss"])]
    return checks


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="demo_data/micro")
    parser.add_argument("--out", default="benchmarks/results/ablations")
    parser.add_argument("--steps", type=int, default=None, help="CPT steps per variant (default: the recipe's)")
    parser.add_argument("--variants", default="prolong,theta_unchanged,no_masking,long_only")
    args = parser.parse_args(argv)
    from prolong.demo.micro_data import MICRO_FACTOR, MICRO_WINDOW, RECALL_TASK
    from prolong.demo.micro_report import plot_recall_and_loss

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    rows = {}
    for name in args.variants.split(","):
        rows[name] = variant_runs(name, args.data, out, args.steps)
        print(json.dumps(rows[name]), flush=True)
    lines = ["# Micro-ProLong ablations", "",
             f"Command: `python benchmarks/ablations.py --data {args.data} --out {args.out}"
             + (f" --steps {args.steps}" if args.steps else "") + "`", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs visible, Python {platform.python_version()}; "
             f"wall time {time.time() - start:.0f} s for all variants.", "",
             f"Scores after CPT + SFT from the committed base. Recall: `{RECALL_TASK}` from `evaluation`, 20 samples "
             "per length (greedy); short-text loss: held-out man pages in 256-token rows.", "",
             "| variant | recall @ 256 | recall @ 1024 | held-out short-text loss | wall s |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['variant']} | {r['recall_native']:.0f}% | {r['recall_4x']:.0f}% | {r['short_loss']:.3f} | {r['seconds']} |"
              for r in rows.values()]
    if {"prolong", "theta_unchanged", "no_masking", "long_only"} <= rows.keys():
        lines += ["", "| ablation | paper's direction | reproduced here |", "| --- | --- | --- |"]
        lines += [f"| {a} | {d} | {'yes' if ok else 'no'} |" for a, d, ok in directions(rows)]
    (out / "ablations.md").write_text("\n".join(lines) + "\n")
    (out / "ablations.json").write_text(json.dumps(list(rows.values()), indent=2))
    runs = list(rows.values())
    plot_recall_and_loss([r["variant"] for r in runs], [r["recall_native"] for r in runs], [r["recall_4x"] for r in runs],
                         [r["short_loss"] for r in runs], MICRO_WINDOW, MICRO_FACTOR, out / "ablations.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
