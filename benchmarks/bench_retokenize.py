"""Re-tokenization throughput: `prolong-data import-mds --tokenizer` on the demo corpus.

    python benchmarks/bench_retokenize.py --max_mb 2 --repeats 3

Set-up, outside the clock: the demo corpus (`prolong-data demo`: code_repos and books long, short
concatenated) is built with SmolLM2's tokenizer at 1024 tokens, and its packed rows are written as MDS
shards in ProLong's released layout (ids, [start, end) spans, length, domain), so it stands for the
release with SmolLM2 in Llama-3's place. Both tokenizers are loaded once.

Timed, alternating, median of --repeats, source tokens per second:
* `import` — plain `import-mds` (the ids as they are): reading the shards and writing the output;
* `retokenize` — `import-mds --tokenizer` to the micro base's BPE (recipes/tiny/base-model): decode,
  encode, round-trip check, work files, `pack_dataset`;
* `tokenizers` — the two tokenizers alone on the same spans (`batch_decode`, then the target's batch
  encode): the floor that re-tokenization cannot beat.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would print inside the timings
MICRO = str(ROOT / "recipes" / "tiny" / "base-model")


def write_mds(directory: Path, rows: list[dict], domain: str, samples_per_shard: int = 256) -> None:
    """MDS shards as streaming's MDSWriter writes them (streaming cannot be installed beside transformers 5)."""
    names = ["domain", "indices", "input_ids", "length"]  # MDSWriter sorts the columns
    encodings = ["str", "ndarray:uint32", "ndarray:uint32", "int"]
    config = {"column_encodings": encodings, "column_names": names, "column_sizes": [None, None, None, 8],
              "compression": None, "format": "mds", "hashes": [], "size_limit": 1 << 26, "version": 2}
    config_bytes = json.dumps(config, sort_keys=True).encode()

    def ndarray(values) -> bytes:
        array = np.asarray(values, np.uint32)
        return bytes([(array.ndim << 2) | 2]) + np.array(array.shape, np.uint32).tobytes() + array.tobytes()

    directory.mkdir(parents=True)
    shards = []
    for first in range(0, len(rows), samples_per_shard):
        samples = []
        for row in rows[first:first + samples_per_shard]:
            columns = [domain.encode(), ndarray(row["indices"]), ndarray(row["input_ids"]),
                       np.int64(len(row["input_ids"])).tobytes()]
            samples.append(np.array([len(c) for c in columns[:3]], np.uint32).tobytes() + b"".join(columns))
        header = 4 + 4 * (len(samples) + 1) + len(config_bytes)
        offsets = header + np.concatenate([[0], np.cumsum([len(s) for s in samples])])
        raw = np.uint32(len(samples)).tobytes() + offsets.astype(np.uint32).tobytes() + config_bytes + b"".join(samples)
        name = f"shard.{len(shards):05d}.mds"
        (directory / name).write_bytes(raw)
        shards.append({**config, "samples": len(samples), "raw_data": {"basename": name, "bytes": len(raw),
                                                                        "hashes": {}}, "zip_data": None})
    (directory / "index.json").write_text(json.dumps({"version": 2, "shards": shards}))


def build_release(work: Path, max_mb: float, source) -> tuple[Path, int, list]:
    """The demo corpus packed with `source`, as an MDS release: (root, its token count, its spans)."""
    import datasets

    from prolong.data.demo_corpus import build_demo_corpus

    packed = build_demo_corpus(source, work / "demo", length=1024, max_bytes_per_domain=int(max_mb * 1e6))
    release, tokens, spans = work / "release", 0, []
    for name, path in packed.items():
        rows = datasets.load_from_disk(str(path)).select_columns(["input_ids", "indices"]).to_list()
        write_mds(release / name, rows, name)
        tokens += sum(len(row["input_ids"]) for row in rows)
        spans += [np.asarray(row["input_ids"][a:b]) for row in rows for a, b in row["indices"]]
    return release, tokens, spans


def run(method: str, release: Path, out: Path, source, target, spans) -> tuple[float, dict]:
    from prolong.data.mds import import_mds

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    result = {}
    if method == "import":
        result = import_mds(release, out)
    elif method == "retokenize":
        result = import_mds(release, out, tokenizer=target, source_tokenizer=source)
    else:
        for first in range(0, len(spans), 512):
            texts = source.batch_decode([s.tolist() for s in spans[first:first + 512]], skip_special_tokens=False,
                                        clean_up_tokenization_spaces=False)
            target(texts, add_special_tokens=False)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_mb", type=float, default=2.0, help="text per demo domain, in MB (default: 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()

    import datasets
    import logging

    from prolong.data.tokenize import load_named_tokenizer as load_tokenizer

    datasets.disable_progress_bars()
    logging.getLogger("prolong.data").setLevel(logging.WARNING)
    source, target = load_tokenizer("smollm2"), load_tokenizer(MICRO)
    work = Path(tempfile.mkdtemp(prefix="bench_retokenize-"))
    try:
        release, tokens, spans = build_release(work, args.max_mb, source)
        seconds = {method: [] for method in ("import", "retokenize", "tokenizers")}
        results = {}
        for _ in range(args.repeats):
            for method in seconds:
                elapsed, results[method] = run(method, release, work / method, source, target, spans)
                seconds[method].append(elapsed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mismatches = sum(m["round_trip_mismatches"] for m in results["retokenize"].values())
    target_tokens = sum(m["num_tokens"] + m["dropped_tokens"] for m in results["retokenize"].values())
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "source_tokens": tokens, "documents": len(spans), "target_tokens": target_tokens,
        "round_trip_mismatches": mismatches,
        "methods": {method: {"median_s": statistics.median(s), "spread_s": [min(s), max(s)],
                             "source_tokens_per_s": tokens / statistics.median(s)} for method, s in seconds.items()},
    }
    for method, row in report["methods"].items():
        print(f"{method:>11}: {row['source_tokens_per_s']:>12,.0f} source tokens/s  (median {row['median_s']:.2f} s, "
              f"{row['spread_s'][0]:.2f}-{row['spread_s'][1]:.2f})")
    print(f"{tokens:,} source tokens in {len(spans):,} documents -> {target_tokens:,} target tokens; "
          f"round-trip mismatches: {mismatches}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
