"""Pack a tokenized dataset into fixed-length sequences, keeping document boundaries.

ProLong's three modes (see docs/data.md):

* `long`:  only documents with at least `min_length` tokens; each is cut into `length`-token
  sequences, one span each. The tail of a document (< `length` tokens) is dropped and counted.
  With `document_length` D (ProLong's stage-2 rows, e.g. 64K documents in 512K rows): documents of
  at least D tokens are cut into D-token pieces, and `length` / D pieces fill a row, each its own
  span; shorter documents are dropped and counted.
* `short`: documents are concatenated; a document that does not fit is continued in the next
  sequence (as a new span). The final partial sequence is dropped and counted.
* `sft`:   whole conversations are bin-packed best-fit-decreasing into rows of at most `length`
  tokens (rows may be shorter); a conversation is never split; longer ones are dropped and counted.

The work is vectorised over Arrow/numpy buffers one chunk at a time (no per-token Python), the input
is read sequentially and the output is written shard by shard, so memory does not grow with the
corpus. Each output row has `indices`: [start, end) spans covering the row exactly, one per document
piece; the trainer's collator restarts positions and blocks attention at every span.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections import Counter
from dataclasses import dataclass, field

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from .storage import (FORMAT_VERSION, ShardedDatasetWriter, atomic_output_dir, check_output_dir, created_by,
                      dataset_dirs, iter_table_chunks, load_dataset_dir, read_metadata, write_metadata)

logger = logging.getLogger("prolong.data")

MODES = ("long", "short", "sft")


def packed_features(with_mask: bool) -> datasets.Features:
    features = {
        "input_ids": datasets.List(datasets.Value("int32")),
        "indices": datasets.List(datasets.List(datasets.Value("int32"))),
        "domain": datasets.Value("string"),
    }
    if with_mask:
        features["mask"] = datasets.List(datasets.Value("int8"))
    return datasets.Features(features)


@dataclass
class PackStats:
    num_sequences: int = 0
    num_tokens: int = 0
    domain_tokens: Counter = field(default_factory=Counter)
    documents_in: int = 0
    dropped_documents: int = 0  # long: shorter than min_length; sft: longer than length
    dropped_tokens: int = 0     # every input token that is not in the output


def _list_array(offsets: np.ndarray, values: pa.Array | np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)


def _spans_array(span_starts: np.ndarray, span_ends: np.ndarray, spans_per_row: np.ndarray) -> pa.ListArray:
    """Build list<list<int32>>: row r holds its [start, end) pairs."""
    pairs = np.stack([span_starts, span_ends], axis=1).astype(np.int32).ravel()
    inner = _list_array(np.arange(0, len(pairs) + 1, 2), pa.array(pairs, pa.int32()))
    return _list_array(np.concatenate([[0], np.cumsum(spans_per_row)]), inner)


def _rows_table(tokens: np.ndarray, row_offsets: np.ndarray, span_starts: np.ndarray,
                span_ends: np.ndarray, spans_per_row: np.ndarray, row_domains: list[str] | pa.Array,
                mask: np.ndarray | None) -> pa.Table:
    columns = {
        "input_ids": _list_array(row_offsets, pa.array(tokens, pa.int32())),
        "indices": _spans_array(span_starts, span_ends, spans_per_row),
        "domain": pa.array(row_domains, pa.string()),
    }
    if mask is not None:
        columns["mask"] = _list_array(row_offsets, pa.array(mask, pa.int8()))
    return pa.table(columns)


class _DomainCodes:
    """Map domain strings to small ints so spans can carry their domain as a numpy array."""

    def __init__(self):
        self.names: list[str] = []

    def encode(self, column: pa.Array) -> np.ndarray:
        for name in pc.unique(column).to_pylist():
            if name not in self.names:
                self.names.append(name)
        return pc.index_in(column, value_set=pa.array(self.names, pa.string())).to_numpy(zero_copy_only=False)

    def decode(self, codes: np.ndarray) -> pa.Array:
        return pa.array(self.names, pa.string()).take(pa.array(codes, pa.int32()))

    def count(self, codes: np.ndarray, weights: np.ndarray, into: Counter) -> None:
        for code, total in enumerate(np.bincount(codes, weights=weights, minlength=len(self.names))):
            if total:
                into[self.names[code]] += int(total)


def _chunk_arrays(table: pa.Table, with_mask: bool):
    """Flat token (and mask) buffers plus per-document lengths of one chunk, zero-copy where possible."""
    input_ids = table.column("input_ids").combine_chunks()
    lengths = pc.list_value_length(input_ids).to_numpy(zero_copy_only=False).astype(np.int64)
    tokens = input_ids.flatten().to_numpy(zero_copy_only=False)
    mask = None
    if with_mask:
        mask = table.column("mask").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        if len(mask) != len(tokens):
            raise ValueError("tokenized dataset has a `mask` whose length differs from `input_ids`")
    return tokens, mask, lengths


def _pack_long(chunks, writer, stats, codes, length, min_length, with_mask, progress, document_length=None):
    """Cut each kept document into `piece`-token pieces (piece = document_length, else length), one span
    each, and put length // piece consecutive pieces in a row; pieces that fill no whole row are carried
    to the next chunk, and dropped (counted) at the end."""
    piece = document_length or length
    per_row = length // piece
    carry_tokens, carry_mask, carry_domains = np.zeros(0, np.int32), np.zeros(0, np.int8), np.zeros(0, np.int64)
    for table in chunks:
        tokens, mask, lengths = _chunk_arrays(table, with_mask)
        domains = codes.encode(table.column("domain").combine_chunks()).astype(np.int64)
        stats.documents_in += len(lengths)
        kept = lengths >= min_length
        stats.dropped_documents += int((~kept).sum())
        pieces_per_doc = np.where(kept, lengths // piece, 0)
        # Keep each token whose position in its document falls inside a whole piece.
        doc_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        position_in_doc = np.arange(len(tokens)) - np.repeat(doc_starts, lengths)
        keep = position_in_doc < np.repeat(pieces_per_doc * piece, lengths)
        stats.dropped_tokens += int(len(tokens) - keep.sum())
        tokens = np.concatenate([carry_tokens, tokens[keep]])
        mask = np.concatenate([carry_mask, mask[keep]]) if with_mask else None
        piece_domains = np.concatenate([carry_domains, np.repeat(domains, pieces_per_doc)])
        num_rows = len(piece_domains) // per_row
        used = num_rows * length
        if num_rows:
            span_starts = np.tile(np.arange(per_row) * piece, num_rows)
            writer.write(_rows_table(tokens[:used], np.arange(num_rows + 1) * length, span_starts,
                                     span_starts + piece, np.full(num_rows, per_row),
                                     codes.decode(piece_domains[:num_rows * per_row:per_row]),
                                     mask[:used] if with_mask else None))
            codes.count(piece_domains[:num_rows * per_row], np.full(num_rows * per_row, piece), stats.domain_tokens)
        stats.num_sequences += num_rows
        carry_tokens, carry_domains = tokens[used:].copy(), piece_domains[num_rows * per_row:].copy()
        carry_mask = mask[used:].copy() if with_mask else carry_mask
        progress.update(len(lengths))
    if len(carry_tokens):
        logger.info("long: %d piece(s) of %d tokens left over, fewer than one %d-token row: dropped",
                    len(carry_domains), piece, length)
    stats.dropped_tokens += len(carry_tokens)


def _pack_short(chunks, writer, stats, codes, length, with_mask, progress):
    # The carry holds the tail of the previous chunk: its tokens, and the lengths/domains of the
    # document pieces in it (the first piece may continue a document begun in an earlier row).
    carry_tokens = np.zeros(0, np.int32)
    carry_mask = np.zeros(0, np.int8) if with_mask else None
    carry_lengths = np.zeros(0, np.int64)
    carry_domains = np.zeros(0, np.int64)
    for table in chunks:
        tokens, mask, lengths = _chunk_arrays(table, with_mask)
        domains = codes.encode(table.column("domain").combine_chunks()).astype(np.int64)
        stats.documents_in += len(lengths)
        nonempty = lengths > 0
        tokens = np.concatenate([carry_tokens, tokens])
        mask = np.concatenate([carry_mask, mask]) if with_mask else None
        lengths = np.concatenate([carry_lengths, lengths[nonempty]])
        domains = np.concatenate([carry_domains, domains[nonempty]])

        num_rows = len(tokens) // length
        used = num_rows * length
        doc_ends = np.cumsum(lengths)
        doc_starts = doc_ends - lengths
        # Spans are cut at every document start and every row boundary.
        cuts = np.union1d(doc_starts[doc_starts < used], np.arange(0, used, length))
        span_ends = np.append(cuts[1:], used)
        span_rows = cuts // length
        span_domains = domains[np.searchsorted(doc_ends, cuts, side="right")]
        spans_per_row = np.bincount(span_rows, minlength=num_rows)
        if num_rows:
            first_span = np.concatenate([[0], np.cumsum(spans_per_row)[:-1]])
            writer.write(_rows_table(tokens[:used], np.arange(num_rows + 1) * length,
                                     cuts - span_rows * length, span_ends - span_rows * length,
                                     spans_per_row, codes.decode(span_domains[first_span]),
                                     mask[:used] if with_mask else None))
            codes.count(span_domains, span_ends - cuts, stats.domain_tokens)
        stats.num_sequences += num_rows

        # What did not fit becomes the carry: the piece of the document running past `used`, then
        # every later document.
        open_docs = doc_ends > used
        carry_lengths = np.minimum(lengths[open_docs], doc_ends[open_docs] - used)
        carry_domains = domains[open_docs]
        carry_tokens = tokens[used:].copy()
        carry_mask = mask[used:].copy() if with_mask else None
        progress.update(len(nonempty))
    stats.dropped_tokens += len(carry_tokens)


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Bin ids for items of `lengths` (all <= capacity), packed best-fit-decreasing.

    A sorted list of (free space, bin) pairs finds the fullest bin the item still fits in with one
    bisect; one Python step per item (conversation), never per token.
    """
    order = np.argsort(-lengths, kind="stable")
    bin_of_item = np.empty(len(lengths), np.int64)
    open_bins: list[tuple[int, int]] = []  # (free space, bin id), sorted
    num_bins = 0
    for item in order.tolist():
        size = int(lengths[item])
        slot = bisect.bisect_left(open_bins, (size, -1))
        if slot < len(open_bins):
            space, bin_id = open_bins.pop(slot)
        else:
            space, bin_id = capacity, num_bins
            num_bins += 1
        bin_of_item[item] = bin_id
        if space - size > 0:
            bisect.insort(open_bins, (space - size, bin_id))
    return bin_of_item


def _pack_sft(dataset, writer, stats, codes, length, with_mask, progress, seed, rows_per_write=2048):
    lengths = np.asarray(dataset.with_format("numpy")["length"], dtype=np.int64)
    stats.documents_in = len(lengths)
    fits = (lengths <= length) & (lengths > 0)
    stats.dropped_documents = int((lengths > length).sum())
    stats.dropped_tokens = int(lengths[~fits].sum())
    if stats.dropped_documents:
        logger.warning("sft: dropped %d conversation(s) longer than --length %d (never split)",
                       stats.dropped_documents, length)
    doc_ids = np.flatnonzero(fits)
    bins = best_fit_decreasing(lengths[doc_ids], length)
    # Rows in a shuffled order: best-fit-decreasing would otherwise put every long conversation first.
    row_order = np.random.default_rng(seed).permutation(bins.max() + 1 if len(bins) else 0)
    rank_of_bin = np.empty_like(row_order)
    rank_of_bin[row_order] = np.arange(len(row_order))
    by_row = np.lexsort((doc_ids, rank_of_bin[bins]))  # docs grouped by output row
    doc_ids, doc_rows = doc_ids[by_row], rank_of_bin[bins][by_row]
    columns = ["input_ids", "domain"] + (["mask"] if with_mask else [])
    source = dataset.with_format("arrow", columns=columns)
    row_starts = np.searchsorted(doc_rows, np.append(np.arange(0, len(row_order), rows_per_write), len(row_order)))
    for begin, end in zip(row_starts[:-1], row_starts[1:]):
        ids, rows = doc_ids[begin:end], doc_rows[begin:end]
        table = source[ids.tolist()]
        tokens, mask, doc_lengths = _chunk_arrays(table, with_mask)
        domains = codes.encode(table.column("domain").combine_chunks())
        first_doc_of_row = np.flatnonzero(np.diff(rows, prepend=-1))
        docs_per_row = np.diff(np.append(first_doc_of_row, len(rows)))
        doc_ends = np.cumsum(doc_lengths)
        row_ends = doc_ends[np.append(first_doc_of_row[1:], len(rows)) - 1]
        row_offsets = np.concatenate([[0], row_ends])
        row_of_doc = np.repeat(np.arange(len(first_doc_of_row)), docs_per_row)
        span_starts = doc_ends - doc_lengths - row_offsets[row_of_doc]
        writer.write(_rows_table(tokens, row_offsets, span_starts, span_starts + doc_lengths,
                                 docs_per_row, codes.decode(domains[first_doc_of_row]), mask))
        codes.count(domains, doc_lengths, stats.domain_tokens)
        stats.num_sequences += len(first_doc_of_row)
        progress.update(len(ids))


def _no_rows_message(source: str, mode: str, length: int, min_length: int, tokenized: datasets.Dataset,
                     document_length: int | None = None) -> str:
    """Why packing gave no row, and what to change (an empty output would train on nothing)."""
    if not len(tokenized):
        return f"{source} holds no documents: nothing to pack"
    lengths = pc.list_value_length(tokenized.with_format("arrow", columns=["input_ids"])[:]["input_ids"])
    longest, total = pc.max(lengths).as_py() or 0, pc.sum(lengths).as_py() or 0
    if mode == "long" and document_length:
        return (f"--mode long --length {length} --document_length {document_length}: {source} does not hold "
                f"{length // document_length} document piece(s) of {document_length} tokens, one row (documents of "
                f"{min_length} tokens or more; the longest of its {len(tokenized)} has {longest}); give a smaller "
                "--document_length or --length, or pack this data with --mode short")
    if mode == "long":
        return (f"--mode long --length {length}: no document of {source} has {max(length, min_length)} tokens "
                f"or more (the longest of its {len(tokenized)} has {longest}); give a smaller --length, or "
                "pack this data with --mode short")
    if mode == "short":
        return (f"--mode short --length {length}: {source} holds {total} tokens in all, less than one row; "
                "give a smaller --length")
    return (f"--mode sft --length {length}: every conversation of {source} is longer than {length} tokens "
            f"(the longest has {longest}); give a larger --length")


def check_document_length(mode: str, length: int, document_length: int | None) -> None:
    """--document_length D: long mode only, 2 or more, and `length` a whole number of D-token documents."""
    if document_length is None:
        return
    if mode != "long":
        raise ValueError(f"--document_length applies to --mode long only (got --mode {mode}); leave it out")
    if document_length < 2:
        raise ValueError(f"--document_length must be a number of tokens, 2 or more, got {document_length}")
    if length % document_length:
        raise ValueError(f"--length {length} is not a multiple of --document_length {document_length}: a row "
                         f"holds a whole number of documents; give a --document_length that divides {length}")


def pack_dataset(tokenized: datasets.Dataset | str | os.PathLike, out_dir: str | os.PathLike, *,
                 mode: str, length: int, min_length: int | None = None, overwrite: bool = False,
                 seed: int = 0, tokenizer_name: str | None = None, document_length: int | None = None,
                 max_shard_bytes: int | None = None, chunk_rows: int = 4096,
                 extra_metadata: dict | None = None) -> dict:
    """Pack a tokenized dataset (a Dataset or a `prolong-data tokenize` directory) into `out_dir`.

    Returns the metadata written to `out_dir/prolong_data.json`. `chunk_rows` documents (fewer if
    they hold more than ~4M tokens) are packed at a time: that bounds memory, not the result.
    `document_length` (long mode): rows of `length` tokens made of `document_length`-token documents.
    `extra_metadata`: more fields for `prolong_data.json` (where the documents came from).
    """
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {MODES}, got {mode!r}")
    if length < 2:  # a 1-token row has no token to predict: training on it would report loss 0
        raise ValueError(f"--length must be a positive number of tokens, 2 or more (one token to predict from "
                         f"the one before), got {length}")
    if min_length is not None and mode != "long":
        raise ValueError(f"--min_length applies to --mode long only (got --mode {mode}); leave it out")
    if min_length is not None and min_length < 2:
        raise ValueError(f"--min_length must be a positive number of tokens, 2 or more, got {min_length}")
    check_document_length(mode, length, document_length)
    source_metadata, source = {}, "the tokenized dataset"
    inputs = dataset_dirs(tokenized) if isinstance(tokenized, datasets.Dataset) else [tokenized]
    if not isinstance(tokenized, datasets.Dataset):
        source = str(tokenized)
        source_metadata = read_metadata(tokenized) or {}
        tokenized = load_dataset_dir(tokenized, flag="--input")
    if source_metadata.get("format") == "prolong-packed" or "indices" in tokenized.column_names:
        # Each packed row would be taken as one document: its document spans would be merged.
        raise ValueError(
            f"{source} is already packed ({source_metadata.get('mode', '?')} mode, "
            f"length {source_metadata.get('length', '?')}): packing it again would merge the documents of "
            "each row into one. Pack the `prolong-data tokenize` output it was made from instead")
    for column in ("input_ids", "domain"):
        if column not in tokenized.column_names:
            raise ValueError(f"tokenized dataset has no `{column}` column (columns: {tokenized.column_names}); "
                             "create it with `prolong-data tokenize`")
    check_output_dir(out_dir, overwrite=overwrite, fmt="prolong-packed", inputs=inputs)  # before any work
    if mode == "sft" and "length" not in tokenized.column_names:
        tokenized = tokenized.map(lambda b: {"length": [len(x) for x in b["input_ids"]]}, batched=True)
    with_mask = "mask" in tokenized.column_names
    if mode == "sft" and not with_mask:
        logger.warning("sft: the tokenized dataset has no `mask` column: every token will be a loss "
                       "target (tokenize chat data from a `messages` field to get an assistant mask)")
    piece = document_length or length
    if min_length is None:
        min_length = piece
    if mode == "long" and min_length < piece:
        flag = "--document_length" if document_length else "--length"
        logger.info("long: documents shorter than %s %d give no sequence, whatever --min_length", flag, piece)

    stats = PackStats()
    codes = _DomainCodes()
    writer_kwargs = {"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}
    with atomic_output_dir(out_dir, overwrite=overwrite, fmt="prolong-packed", inputs=inputs) as tmp:
        writer = ShardedDatasetWriter(tmp, packed_features(with_mask), **writer_kwargs)
        with tqdm(total=len(tokenized), unit="doc", desc=f"pack {mode} L={length}") as progress:
            if mode == "sft":
                _pack_sft(tokenized, writer, stats, codes, length, with_mask, progress, seed, chunk_rows)
            else:
                columns = ["input_ids", "domain"] + (["mask"] if with_mask else [])
                chunks = iter_table_chunks(tokenized, columns, min_rows=chunk_rows, max_values=max(1 << 22, 4 * length))
                if mode == "long":
                    _pack_long(chunks, writer, stats, codes, length, min_length, with_mask, progress,
                               document_length)
                else:
                    _pack_short(chunks, writer, stats, codes, length, with_mask, progress)
        writer.close()
        if not stats.num_sequences:
            raise ValueError(_no_rows_message(source, mode, length, min_length, tokenized, document_length))
        stats.num_tokens = sum(stats.domain_tokens.values())
        metadata = {
            "format": "prolong-packed",
            "version": FORMAT_VERSION,
            "mode": mode,
            "length": length,
            "document_length": document_length,  # long: the tokens of each document in a row (None: one per row)
            "num_sequences": stats.num_sequences,
            "num_tokens": stats.num_tokens,
            "domains": dict(sorted(stats.domain_tokens.items())),
            "tokenizer": tokenizer_name or source_metadata.get("tokenizer"),
            "created_by": created_by(),
            "min_length": min_length if mode == "long" else None,
            "documents_in": stats.documents_in,
            "dropped_documents": stats.dropped_documents,
            "dropped_tokens": stats.dropped_tokens,
            **(extra_metadata or {}),
        }
        write_metadata(tmp, metadata)  # written last: its presence marks a complete output
    logger.info("packed %d documents into %d sequences of %d tokens (%s mode); dropped %d document(s) and "
                "%d token(s)", stats.documents_in, stats.num_sequences, length, mode, stats.dropped_documents,
                stats.dropped_tokens)
    return metadata
