"""python -m evaluation.compare RUN_DIR [RUN_DIR ...] [--output FILE]: one markdown table of
category scores (and the average over categories) per run and length."""
import argparse
import json
import os

from .tasks import CATEGORIES


def load_run(run_dir: str) -> dict:
    path = os.path.join(run_dir, "scores.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {run_dir} an evaluation output_dir?")
    with open(path) as f:
        return json.load(f)


def comparison_table(run_dirs: list[str]) -> str:
    runs = [(d, load_run(d)) for d in run_dirs]
    categories = [c for c in CATEGORIES if any(c in s["categories"] for _, s in runs)]
    lines = ["| run | mode | length | " + " | ".join(CATEGORIES[c] for c in categories) + " | avg |",
             "|---" * (len(categories) + 4) + "|"]
    for run_dir, scores in runs:
        lengths = sorted({int(n) for by_len in scores["categories"].values() for n in by_len})
        for length in lengths:
            values = [scores["categories"].get(c, {}).get(str(length)) for c in categories]
            present = [v for v in values if v is not None]
            cells = ["-" if v is None else f"{v:.1f}" for v in values]
            avg = f"{sum(present) / len(present):.1f}" if present else "-"
            lines.append(f"| {os.path.basename(os.path.normpath(run_dir))} | {scores.get('mode', 'helmet')} | {length} | "
                         + " | ".join(cells) + f" | {avg} |")
    modes = {scores.get("mode", "helmet") for _, scores in runs}
    if len(modes) > 1:  # helmet-mode numbers compare with published HELMET tables, fixed-mode ones do not
        lines += ["", f"Note: these runs used different modes ({', '.join(sorted(modes))}); their scores are not "
                      "directly comparable (docs/evaluation.md lists the differences)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--output", help="also write the table to this file")
    args = parser.parse_args(argv)
    table = comparison_table(args.run_dirs)
    print(table)
    if args.output:
        with open(args.output, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
