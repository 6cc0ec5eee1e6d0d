"""`prolong-data inspect`: what is in a tokenized or packed directory (tokens per domain, number of
rows, and a histogram of document lengths; for packed data a document is one span)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.compute as pc
from tqdm.auto import tqdm

from .storage import iter_table_chunks, load_dataset_dir, read_metadata


def summarize(directory: str | os.PathLike) -> dict:
    dataset = load_dataset_dir(directory, flag="inspect")
    metadata = read_metadata(directory) or {}
    packed = "indices" in dataset.column_names
    domain_tokens: dict[str, int] = {}
    histogram = np.zeros(64, np.int64)  # bucket b: documents with 2**b <= length < 2**(b+1)
    row_lengths: set[int] = set()
    num_rows = num_tokens = num_documents = 0
    columns = ["input_ids", "domain"] + (["indices"] if packed else [])
    with tqdm(total=len(dataset), unit="row", desc="inspect") as progress:
        for table in iter_table_chunks(dataset, columns):
            lengths = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False)
            if packed:
                pairs = table.column("indices").combine_chunks().flatten().flatten().to_numpy(zero_copy_only=False)
                doc_lengths = pairs[1::2].astype(np.int64) - pairs[0::2]
            else:
                doc_lengths = lengths
            grouped = table.select(["domain"]).append_column("n", pc.list_value_length(table.column("input_ids")))
            for row in grouped.group_by("domain").aggregate([("n", "sum")]).to_pylist():
                domain_tokens[row["domain"]] = domain_tokens.get(row["domain"], 0) + int(row["n_sum"])
            positive = doc_lengths[doc_lengths > 0]
            histogram += np.bincount(np.log2(positive).astype(np.int64), minlength=64)[:64]
            row_lengths.update(np.unique(lengths).tolist())
            num_rows += table.num_rows
            num_tokens += int(lengths.sum())
            num_documents += len(doc_lengths)
            progress.update(table.num_rows)
    return {"directory": str(directory), "kind": metadata.get("format", "packed" if packed else "tokenized"),
            "mode": metadata.get("mode"), "num_rows": num_rows, "num_tokens": num_tokens,
            "num_documents": num_documents, "domains": dict(sorted(domain_tokens.items())),
            "row_lengths": sorted(row_lengths) if len(row_lengths) <= 8 else [min(row_lengths), max(row_lengths)],
            "length_histogram": {f"{2**b}-{2**(b + 1) - 1}": int(n) for b, n in enumerate(histogram) if n},
            "metadata": metadata}


def format_summary(summary: dict, width: int = 40) -> str:
    lines = [f"{summary['directory']}: {summary['kind']}" + (f" ({summary['mode']} mode)" if summary["mode"] else ""),
             f"  rows: {summary['num_rows']:,}   tokens: {summary['num_tokens']:,}   "
             f"documents{' (spans)' if 'indices' in str(summary['kind']) or summary['mode'] else ''}: "
             f"{summary['num_documents']:,}",
             f"  row lengths: {summary['row_lengths']}",
             "  tokens per domain:"]
    for name, tokens in summary["domains"].items():
        share = tokens / summary["num_tokens"] if summary["num_tokens"] else 0
        lines.append(f"    {name:<24} {tokens:>14,}  {share:6.1%}")
    lines.append("  document length histogram (tokens):")
    largest = max(summary["length_histogram"].values(), default=1)
    for bucket, count in summary["length_histogram"].items():
        lines.append(f"    {bucket:>15} {count:>10,} {'#' * max(1, round(width * count / largest))}")
    skipped = summary["metadata"].get("skipped")
    if skipped:
        lines.append(f"  skipped at tokenization: {skipped}")
    return "\n".join(lines)
