"""Throughput of `prolong-data build` on the demo corpus, against the same domains through separate
`prolong-data tokenize` + `pack` calls (what a user types without a recipe).

    python benchmarks/bench_data_build.py --tokenizer smollm2 --max_mb 2 --repeats 3

Set-up, outside the clock: the demo corpus's raw texts (prolong.data.demo_corpus.demo_texts: standard-library
repositories, books, man pages) written as jsonl files, and a data recipe naming them (code and books long,
man pages short, L = --length). Each method runs as the commands a user types, in fresh processes: `build`
is one process; the baseline is three `tokenize` and three `pack` processes. The methods alternate
(A B A B ...); tokens/s = packed tokens out / wall time, median over --repeats with the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DOMAINS = {"code_repos": ("long", 0.3), "books": ("long", 0.3), "short": ("short", 0.4)}


def write_corpus(root: Path, max_mb: float, length: int) -> Path:
    from prolong.data.demo_corpus import demo_texts

    texts = demo_texts(int(max_mb * 1e6))
    lines = [f"length: {length}", "domains:"]
    for name, (mode, share) in DOMAINS.items():
        with open(root / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": text}) + "\n" for text in texts[name])
        lines += [f"  {name}:", f"    share: {share}", f"    files: [{name}.jsonl]", f"    mode: {mode}"]
    recipe = root / "recipe.yaml"
    recipe.write_text("\n".join(lines) + "\n")
    return recipe


def commands(method: str, root: Path, out: Path, tokenizer: str, length: int) -> list[list[str]]:
    data = [sys.executable, "-m", "prolong.data"]
    if method == "build":
        return [data + ["build", str(root / "recipe.yaml"), "--tokenizer", tokenizer, "--out", str(out)]]
    steps = []
    for name, (mode, _) in DOMAINS.items():
        steps.append(data + ["tokenize", str(root / f"{name}.jsonl"), "--domain", name, "--tokenizer", tokenizer,
                             "--out", str(out / "tokenized" / name)])
        steps.append(data + ["pack", str(out / "tokenized" / name), "--mode", mode, "--length", str(length),
                             "--out", str(out / name)])
    return steps


def packed_tokens(out: Path) -> int:
    return sum(json.loads((out / name / "prolong_data.json").read_text())["num_tokens"] for name in DOMAINS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default="smollm2", help="default: the demo's SmolLM2 tokenizer")
    parser.add_argument("--max_mb", type=float, default=2.0, help="raw text per domain, in MB")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write every run here")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench_data_build-"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "true"}
    try:
        write_corpus(root, args.max_mb, args.length)
        raw_mb = sum((root / f"{name}.jsonl").stat().st_size for name in DOMAINS) / 1e6
        print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs; corpus {raw_mb:.1f} MB "
              f"of jsonl, L = {args.length}, tokenizer {args.tokenizer}")
        runs: dict[str, list[dict]] = {"build": [], "tokenize+pack": []}
        for repeat in range(args.repeats):
            for method in runs:  # alternated
                out = root / f"out-{method}"
                shutil.rmtree(out, ignore_errors=True)
                start = time.perf_counter()
                for command in commands(method, root, out, args.tokenizer, args.length):
                    done = subprocess.run(command, env=env, capture_output=True, text=True)
                    if done.returncode:
                        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
                seconds = time.perf_counter() - start
                tokens = packed_tokens(out)
                runs[method].append({"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds})
                print(f"[{repeat + 1}/{args.repeats}] {method:<14} {tokens:>11,} tokens {seconds:7.2f}s "
                      f"{tokens / seconds / 1e3:8.1f}K tokens/s", flush=True)
        print("\n| method | processes | packed tokens | tokens/s (median) | spread |\n|---|---:|---:|---:|---:|")
        for method, rs in runs.items():
            speeds = [r["tokens_per_s"] for r in rs]
            print(f"| {method} | {len(commands(method, root, root, '', args.length))} | {rs[0]['tokens']:,} | "
                  f"{statistics.median(speeds) / 1e3:.1f}K | {min(speeds) / 1e3:.1f}-{max(speeds) / 1e3:.1f}K |")
        if len({r["tokens"] for rs in runs.values() for r in rs}) != 1:
            print("warning: the methods packed different token counts")
        if args.json:
            Path(args.json).write_text(json.dumps(runs, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
