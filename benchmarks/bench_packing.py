"""Packing throughput: `prolong-data pack --mode short` vs TRL's `pack_dataset` on one corpus.

    python benchmarks/bench_packing.py --tokens 20_000_000 --length 8192 --repeats 3

Builds a synthetic tokenized corpus on disk (random token ids, log-normal document lengths, the
`prolong-data tokenize` format), then packs it in a fresh process per run and reports tokens/s
(packing plus writing the result to disk, the way each is used) and the process's peak RSS.
TRL "wrapped" is the closest equivalent of short mode (concatenate and cut, but it keeps no document
boundaries); "bfd" keeps boundaries but truncates documents longer than L.

Fairness: both libraries are imported before the clock starts (``import trl`` alone takes ~2 s);
TRL's ``datasets.map`` cache is off (``disable_caching``: its ``cache-*.arrow`` files would land in
the corpus folder and make a rerun time a cache hit) and any such file is removed before each run;
the methods alternate (A B C A B C ...) and the median over ``--repeats`` is reported with the spread.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_corpus(directory: Path, num_tokens: int, seed: int = 0) -> int:
    """Write a tokenized corpus of about `num_tokens` tokens in batches (memory stays flat)."""
    from prolong.data.storage import ShardedDatasetWriter, atomic_output_dir
    from prolong.data.tokenize import tokenized_features

    rng = np.random.default_rng(seed)
    written = 0
    with atomic_output_dir(directory) as tmp:
        writer = ShardedDatasetWriter(tmp, tokenized_features(chat=False))
        while written < num_tokens:
            lengths = np.clip(rng.lognormal(6.5, 1.2, 4096).astype(np.int64), 16, 200_000)
            tokens = rng.integers(0, 49_152, int(lengths.sum()), dtype=np.int32)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            writer.write(pa.table({"input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(tokens)),
                                   "domain": pa.array(["web"] * len(lengths)), "length": pa.array(lengths)}))
            written += int(lengths.sum())
        writer.close()
    return written


def run_method(method: str, corpus: Path, out: Path, length: int) -> dict:
    """Runs in its own process, so peak RSS is this method's alone."""
    import datasets
    import pyarrow.compute as pc
    import trl.data_utils  # both libraries imported before the clock

    import prolong.data.pack

    datasets.disable_progress_bars()
    datasets.disable_caching()  # map results go to a temporary folder, never into the corpus folder
    start = time.perf_counter()
    if method == "prolong":
        num_tokens = prolong.data.pack.pack_dataset(corpus, out, mode="short", length=length)["num_tokens"]
    else:
        dataset = datasets.load_from_disk(str(corpus)).select_columns(["input_ids"])
        packed = trl.data_utils.pack_dataset(dataset, length, strategy=method.removeprefix("trl-"))
        packed.save_to_disk(str(out))
    seconds = time.perf_counter() - start
    if method != "prolong":  # counted after the clock stops
        num_tokens = pc.sum(pc.list_value_length(packed.data.column("input_ids"))).as_py()
    return {"method": method, "seconds": seconds, "num_tokens": num_tokens,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def remove_map_caches(corpus: Path) -> None:
    for cache in corpus.glob("cache-*.arrow"):
        cache.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=lambda s: int(float(s.replace("_", ""))), default=20_000_000)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--methods", default="prolong,trl-wrapped,trl-bfd")
    parser.add_argument("--repeats", type=int, default=3, help="alternated runs per method (median reported)")
    parser.add_argument("--workdir", help="where to put the corpus and outputs (default: a temp dir)")
    parser.add_argument("--json", help="write every run here")
    parser.add_argument("--run", nargs=3, metavar=("METHOD", "CORPUS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run_method(args.run[0], Path(args.run[1]), Path(args.run[2]), args.length)))
        return

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_packing-"))
    corpus = workdir / "corpus"
    if not corpus.exists():
        start = time.perf_counter()
        total = build_corpus(corpus, args.tokens)
        print(f"corpus: {total:,} tokens in {time.perf_counter() - start:.1f}s at {corpus}")
    methods = args.methods.split(",")
    runs = {method: [] for method in methods}
    for repeat in range(args.repeats):
        for method in methods:  # alternated: A B C A B C
            out = workdir / f"packed-{method}"
            shutil.rmtree(out, ignore_errors=True)
            remove_map_caches(corpus)
            completed = subprocess.run([sys.executable, __file__, "--length", str(args.length), "--run", method,
                                        str(corpus), str(out)], capture_output=True, text=True)
            if completed.returncode:
                print(completed.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{method} failed")
            result = json.loads(completed.stdout.strip().splitlines()[-1])
            result["tokens_per_s"] = result["num_tokens"] / result["seconds"]
            runs[method].append(result)
            print(f"[{repeat + 1}/{args.repeats}] {method:<12} {result['num_tokens']:>13,} tokens  "
                  f"{result['seconds']:7.2f}s  {result['tokens_per_s'] / 1e6:8.1f}M tokens/s  "
                  f"peak RSS {result['peak_rss_mb']:7.0f} MB", flush=True)
    remove_map_caches(corpus)
    median = {m: float(np.median([r["tokens_per_s"] for r in rs])) for m, rs in runs.items()}
    print("\n| method | tokens/s (median) | spread (min-max) | peak RSS (MB) |\n|---|---:|---:|---:|")
    for method, rs in runs.items():
        speeds = [r["tokens_per_s"] for r in rs]
        print(f"| {method} | {median[method] / 1e6:.1f}M | {min(speeds) / 1e6:.1f}-{max(speeds) / 1e6:.1f}M "
              f"| {max(r['peak_rss_mb'] for r in rs):.0f} |")
    if "prolong" in median:
        for method in methods:
            if method != "prolong":
                ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs["prolong"], runs[method])]
                print(f"prolong / {method}: {median['prolong'] / median[method]:.2f}x tokens/s "
                      f"(per alternated pair {min(ratios):.2f}-{max(ratios):.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps({"tokens": args.tokens, "length": args.length, "runs": runs}, indent=2))
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
