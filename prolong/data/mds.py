"""Read mosaicml-streaming MDS shards (the format of ProLong's released data) without the
`streaming` package, which cannot be installed beside transformers 5.

Layout (streaming/base/format/mds/writer.py): a directory with `index.json`
({"version": 2, "shards": [{"raw_data": {"basename": ...}, "zip_data": ..., "compression": ...,
"column_names": [...], "column_encodings": [...], "column_sizes": [...], "samples": n}, ...]}) and
shard files. A shard is: uint32 sample count n; uint32 offsets[n + 1] (absolute byte positions);
a JSON config; the samples. A sample is: one uint32 size per variable-size column, then each
column's bytes, in `column_names` order. Compressed shards (`zip_data`) hold the whole shard file
compressed with `compression` (zstd, gz, bz2; optionally `name:level`).
"""

from __future__ import annotations

import bz2
import gzip
import json
import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from .pack import MODES, packed_features
from .storage import FORMAT_VERSION, ShardedDatasetWriter, atomic_output_dir, created_by, write_metadata

logger = logging.getLogger("prolong.data")

# NDArray value dtype codes (streaming/base/format/mds/encodings.py)
_NDARRAY_DTYPES = {8: "uint8", 9: "int8", 16: "uint16", 17: "int16", 18: "float16", 32: "uint32", 33: "int32",
                   34: "float32", 64: "uint64", 65: "int64", 66: "float64"}
_SHAPE_DTYPES = {0: "uint8", 1: "uint16", 2: "uint32", 3: "uint64"}
_SCALARS = {"uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float16", "float32", "float64"}


def _decompress(algorithm: str, data: bytes, path: Path) -> bytes:
    family = algorithm.split(":")[0]
    if family == "zstd":
        try:
            import zstandard
        except ImportError as error:
            raise RuntimeError(f"{path} is zstd-compressed: pip install zstandard to read it") from error
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    if family == "gz":
        return gzip.decompress(data)
    if family == "bz2":
        return bz2.decompress(data)
    raise ValueError(f"{path}: unsupported MDS compression {algorithm!r} (supported: zstd, gz, bz2)")


def decode_column(encoding: str, data: bytes):
    """Decode one column of one sample, per streaming's MDS encodings."""
    name, _, config = encoding.partition(":")
    if name == "ndarray":
        dtype, _, shape = config.partition(":")
        index = 0
        if not dtype:
            dtype = _NDARRAY_DTYPES[data[index]]
            index += 1
        if shape:
            shape = tuple(int(d) for d in shape.split(","))
        else:
            ndim, shape_dtype = data[index] >> 2, _SHAPE_DTYPES[data[index] & 3]
            index += 1
            size = ndim * np.dtype(shape_dtype).itemsize
            shape = tuple(np.frombuffer(data, shape_dtype, count=ndim, offset=index).tolist())
            index += size
        return np.frombuffer(data, dtype, offset=index).reshape(shape)
    if name == "str":
        return data.decode("utf-8")
    if name == "bytes":
        return data
    if name == "int":
        return int(np.frombuffer(data, np.int64)[0])
    if name in _SCALARS:
        return np.frombuffer(data, name)[0].item()
    if name == "json":
        return json.loads(data.decode("utf-8"))
    if name == "str_int":
        return int(data.decode("utf-8"))
    raise ValueError(f"unsupported MDS column encoding {encoding!r} (pickle and image encodings are not read)")


def _fixed_size(encoding: str) -> int | None:
    name, _, config = encoding.partition(":")
    if name == "int":
        return 8
    if name in _SCALARS:
        return np.dtype(name).itemsize
    if name == "ndarray" and config.count(":") == 1:
        dtype, shape = config.split(":")
        return int(np.prod([int(d) for d in shape.split(",")])) * np.dtype(dtype).itemsize
    return None


def find_index_files(root: str | os.PathLike) -> list[Path]:
    """`root/index.json`, or else every index.json below root (ProLong ships one per domain folder)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"MDS directory {root} does not exist")
    if (root / "index.json").exists():
        return [root / "index.json"]
    found = sorted(root.rglob("index.json"))
    if not found:
        raise FileNotFoundError(f"no index.json in {root} or below: not an MDS (mosaicml-streaming) dataset")
    return found


def iter_mds_samples(root: str | os.PathLike) -> Iterator[tuple[Path, dict]]:
    """Yield (index file, sample dict) for every sample of every shard, in index order."""
    for index_path in find_index_files(root):
        index = json.loads(index_path.read_text())
        for shard in index["shards"]:
            if shard.get("format") != "mds":
                raise ValueError(f"{index_path}: shard format {shard.get('format')!r} is not 'mds'")
            compressed = shard.get("zip_data")
            basename = (compressed or shard["raw_data"])["basename"]
            path = index_path.parent / basename
            if not path.exists():
                raise FileNotFoundError(f"{index_path} lists {basename}, which is missing")
            data = path.read_bytes()
            if compressed:
                data = _decompress(shard["compression"], data, path)
            names, encodings = shard["column_names"], shard["column_encodings"]
            sizes = shard.get("column_sizes") or [_fixed_size(e) for e in encodings]
            num_samples = int(np.frombuffer(data, np.uint32, count=1)[0])
            offsets = np.frombuffer(data, np.uint32, count=num_samples + 1, offset=4).astype(np.int64)
            for begin, end in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
                sample = memoryview(data)[begin:end]
                position, column_sizes = 0, []
                for size in sizes:
                    if size is None:
                        size = int(np.frombuffer(sample, np.uint32, count=1, offset=position)[0])
                        position += 4
                    column_sizes.append(size)
                record = {}
                for name, encoding, size in zip(names, encodings, column_sizes):
                    record[name] = decode_column(encoding, bytes(sample[position:position + size]))
                    position += size
                yield index_path, record


def _sample_to_row(record: dict, default_domain: str, where: str) -> dict:
    if "input_ids" not in record:
        raise ValueError(f"{where}: MDS sample has no `input_ids` column (columns: {sorted(record)})")
    input_ids = np.asarray(record["input_ids"]).reshape(-1)
    if input_ids.size and int(input_ids.max()) > np.iinfo(np.int32).max:
        raise ValueError(f"{where}: token id {int(input_ids.max())} does not fit int32")
    length = len(input_ids)
    spans = record.get("indices")
    spans = (np.array([[0, length]]) if spans is None else np.asarray(spans).reshape(-1, 2)).astype(np.int64)
    if len(spans) == 0 and length == 0:
        spans = np.zeros((0, 2), np.int64)
    contiguous = len(spans) and spans[0, 0] == 0 and spans[-1, 1] == length and np.all(spans[1:, 0] == spans[:-1, 1])
    if length and not (contiguous and np.all(spans[:, 1] > spans[:, 0])):
        raise ValueError(f"{where}: `indices` do not cover [0, {length}) with contiguous non-empty spans")
    row = {"input_ids": input_ids.astype(np.int32), "indices": spans.astype(np.int32),
           "domain": record.get("domain") or default_domain}
    if "mask" in record:
        row["mask"] = np.asarray(record["mask"]).reshape(-1).astype(np.int8)
    return row


def _rows_to_table(rows: list[dict], with_mask: bool) -> pa.Table:
    def lists(arrays, dtype):
        offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int32)
        values = np.concatenate(arrays) if arrays else np.zeros(0, dtype)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(dtype)))

    columns = {
        "input_ids": lists([r["input_ids"] for r in rows], np.int32),
        "indices": pa.ListArray.from_arrays(
            pa.array(np.concatenate([[0], np.cumsum([len(r["indices"]) for r in rows])]).astype(np.int32)),
            lists([pair for r in rows for pair in r["indices"]], np.int32)),
        "domain": pa.array([r["domain"] for r in rows], pa.string()),
    }
    if with_mask:
        columns["mask"] = lists([r.get("mask", np.ones(len(r["input_ids"]), np.int8)) for r in rows], np.int8)
    return pa.table(columns)


def import_mds(mds_dir: str | os.PathLike, out_dir: str | os.PathLike, *, mode: str = "long",
               domain: str | None = None, tokenizer: str | None = None, overwrite: bool = False,
               rows_per_write: int = 64) -> dict:
    """Convert MDS shards under `mds_dir` into a packed dataset at `out_dir`; returns its metadata.

    `domain` is used for samples without a `domain` column (default: the name of the folder holding
    each index.json). `mode` is recorded in the metadata (ProLong's data: long or short).
    """
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {MODES}, got {mode!r}")
    index_files = find_index_files(mds_dir)
    total = sum(shard.get("samples", 0) for path in index_files for shard in json.loads(path.read_text())["shards"])
    with_mask = any("mask" in shard["column_names"] for path in index_files
                    for shard in json.loads(path.read_text())["shards"])
    lengths: set[int] = set()
    domain_tokens: dict[str, int] = {}
    num_rows = 0
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        writer = ShardedDatasetWriter(tmp, packed_features(with_mask))
        pending: list[dict] = []
        for index_path, record in tqdm(iter_mds_samples(mds_dir), total=total, unit="seq", desc="import-mds"):
            row = _sample_to_row(record, domain or index_path.parent.name, f"{index_path.parent} sample {num_rows}")
            lengths.add(len(row["input_ids"]))
            domain_tokens[row["domain"]] = domain_tokens.get(row["domain"], 0) + len(row["input_ids"])
            pending.append(row)
            num_rows += 1
            if len(pending) >= rows_per_write:
                writer.write(_rows_to_table(pending, with_mask))
                pending = []
        if pending:
            writer.write(_rows_to_table(pending, with_mask))
        writer.close()
        if len(lengths) > 1 and mode != "sft":
            logger.warning("imported rows have %d different lengths (%d..%d); recording the largest",
                           len(lengths), min(lengths), max(lengths))
        metadata = {
            "format": "prolong-packed",
            "version": FORMAT_VERSION,
            "mode": mode,
            "length": max(lengths) if lengths else 0,
            "num_sequences": num_rows,
            "num_tokens": sum(domain_tokens.values()),
            "domains": dict(sorted(domain_tokens.items())),
            "tokenizer": tokenizer,
            "created_by": created_by(),
            "source": f"mds:{Path(mds_dir).absolute()}",
        }
        write_metadata(tmp, metadata)
    return metadata
