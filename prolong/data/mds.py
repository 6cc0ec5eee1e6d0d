"""Read mosaicml-streaming MDS shards (the format of ProLong's released data) without the
`streaming` package, which cannot be installed beside transformers 5.

Layout (streaming/base/format/mds/writer.py): a directory with `index.json`
({"version": 2, "shards": [{"raw_data": {"basename": ...}, "zip_data": ..., "compression": ...,
"column_names": [...], "column_encodings": [...], "column_sizes": [...], "samples": n}, ...]}) and
shard files. A shard is: uint32 sample count n; uint32 offsets[n + 1] (absolute byte positions);
a JSON config; the samples. A sample is: one uint32 size per variable-size column, then each
column's bytes, in `column_names` order. Compressed shards (`zip_data`) hold the whole shard file
compressed with `compression` (zstd, gz, bz2; optionally `name:level`). Each of `raw_data`/`zip_data`
may list `hashes` ({algorithm: hex digest}, hashlib's or xxhash's names): every one this machine can
compute is checked, so a damaged or replaced shard is refused, not imported.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from prolong.errors import ExpectedError

from .pack import MODES, packed_features
from .storage import (FORMAT_VERSION, ShardedDatasetWriter, atomic_output_dir, check_output_dir, created_by,
                      write_metadata)

logger = logging.getLogger("prolong.data")

# NDArray value dtype codes (streaming/base/format/mds/encodings.py)
_NDARRAY_DTYPES = {8: "uint8", 9: "int8", 16: "uint16", 17: "int16", 18: "float16", 32: "uint32", 33: "int32",
                   34: "float32", 64: "uint64", 65: "int64", 66: "float64"}
_SHAPE_DTYPES = {0: "uint8", 1: "uint16", 2: "uint32", 3: "uint64"}
_SCALARS = {"uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float16", "float32", "float64"}


# Readers for streaming's compressions: (module, how to decompress, pip install line).
_DECOMPRESSORS = {
    "zstd": ("zstandard", lambda m, data: m.ZstdDecompressor().decompressobj().decompress(data),
             "pip install zstandard"),
    "gz": ("gzip", lambda m, data: m.decompress(data), None),
    "bz2": ("bz2", lambda m, data: m.decompress(data), None),
    "br": ("brotli", lambda m, data: m.decompress(data), "pip install brotli"),
    "snappy": ("snappy", lambda m, data: m.decompress(data), "pip install python-snappy"),
}


def _decompress(algorithm: str, data: bytes, path: Path) -> bytes:
    family = str(algorithm).split(":")[0]
    if family not in _DECOMPRESSORS:
        raise ValueError(f"{path}: unsupported MDS compression {algorithm!r} "
                         f"(supported: {', '.join(_DECOMPRESSORS)})")
    module_name, decompress, install = _DECOMPRESSORS[family]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ExpectedError(f"{path} is {family}-compressed and the {module_name} package is not installed: "
                           f"{install} (or decompress the shards)") from error
    try:
        return decompress(module, data)
    except Exception as error:  # each library has its own error type for corrupt input
        raise ValueError(f"{path}: cannot decompress the {family} shard ({type(error).__name__}: {error}); "
                         "the file is truncated or corrupt: download it again") from error


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


# CodeCreator/datatools (ProLong's packer) writes one `procNN-M` folder per worker process.
_WORKER_FOLDER = re.compile(r"proc\d+-\d+")


def read_index(index_path: Path) -> list[dict]:
    """The shards of one index.json, with errors that name the file."""
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        shards = index["shards"]
        for shard in shards:  # the keys every reader below needs
            for key in ("column_names", "column_encodings"):
                if key not in shard:
                    raise KeyError(key)
            if "basename" not in (shard.get("zip_data") or shard["raw_data"]):
                raise KeyError("basename")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        what = f"no {error}" if isinstance(error, KeyError) else f"{type(error).__name__}: {error}"
        raise ValueError(f"{index_path} is not a valid MDS index.json ({what}); "
                         "it may be truncated: download it again or re-run merge_index") from error
    return shards


def _shard_path(index_path: Path, shard: dict) -> Path:
    return (index_path.parent / (shard.get("zip_data") or shard["raw_data"])["basename"]).resolve()


def select_index_files(root: str | os.PathLike) -> list[Path]:
    """The index.json files under `root` that together list every shard exactly once.

    ProLong's release holds, per domain, a merged index.json listing `procNN-M/shard.*.mds` AND one
    index.json in each worker folder listing the same shards: reading every index would read each
    sample twice. Indexes are taken from the top down; one whose shards are all listed by an index
    above it is skipped; one that lists only some of them is refused (the indexes disagree)."""
    root = Path(root)
    if root.is_file():
        raise NotADirectoryError(f"{root} is a file; give the MDS directory (the folder holding index.json, "
                                 "or a folder of such folders)")
    if not root.is_dir():
        raise FileNotFoundError(f"not found: {root} (the MDS directory to import)")
    candidates = sorted(root.rglob("index.json"), key=lambda p: (len(p.relative_to(root).parts), str(p)))
    if not candidates:
        raise FileNotFoundError(f"no index.json in {root} or below: not an MDS (mosaicml-streaming) dataset")
    chosen: list[Path] = []
    listed_by: dict[Path, Path] = {}
    for index_path in candidates:
        shards = [_shard_path(index_path, shard) for shard in read_index(index_path)]
        if len(set(shards)) < len(shards):
            twice = next(p for p in shards if shards.count(p) > 1)
            raise ValueError(f"{index_path} lists {twice} more than once: re-run merge_index")
        known = [p for p in shards if p in listed_by]
        if shards and len(known) == len(shards):
            logger.debug("%s: its shards are all listed by %s; skipped", index_path, listed_by[known[0]])
            continue
        if known:
            raise ValueError(f"{index_path} and {listed_by[known[0]]} both list {known[0].name} (and "
                             f"{len(known) - 1} more), but not the same shards: the merged index is stale. "
                             "Re-run merge_index on the domain folder, or import the folders one by one")
        chosen.append(index_path)
        listed_by.update(dict.fromkeys(shards, index_path))
    return chosen


def plan_domains(root: str | os.PathLike) -> dict[str | None, list[Path]]:
    """Group the index files to import by output: {None: indexes} for one domain (a folder with its
    own index.json, a domain folder of worker folders, or a single worker folder), else
    {domain folder name: its indexes} for a root of domain folders (ProLong's `prolong-data-64K/`)."""
    root = Path(root)
    indexes = select_index_files(root)
    if (root / "index.json") in indexes:
        return {None: indexes}
    groups: dict[str, list[Path]] = {}
    for index_path in indexes:
        groups.setdefault(index_path.relative_to(root).parts[0], []).append(index_path)
    if all(_WORKER_FOLDER.fullmatch(name) for name in groups):  # a domain folder without a merged index
        return {None: indexes}
    return groups


def default_domain(folder: Path) -> str:
    """A domain folder's name; a worker folder (procNN-M) belongs to the domain folder above it."""
    folder = folder.absolute()
    return folder.parent.name if _WORKER_FOLDER.fullmatch(folder.name) else folder.name


def _digest(algorithm: str, data: bytes) -> str | None:
    """Hex digest with streaming's hash names (hashlib's, xxhash's), or None if this machine lacks it."""
    if algorithm in hashlib.algorithms_available and not algorithm.startswith("shake_"):
        return hashlib.new(algorithm, data).hexdigest()
    try:
        import xxhash
    except ImportError:
        return None
    function = getattr(xxhash, algorithm, None) if algorithm in getattr(xxhash, "algorithms_available", ()) else None
    return function(data).hexdigest() if function else None


_UNCHECKED: set[str] = set()


def _check_hashes(path: Path, data: bytes, listed: dict, index_path: Path) -> None:
    hashes = listed.get("hashes") or {}
    for algorithm, expected in sorted(hashes.items()):
        digest = _digest(algorithm, data)
        if digest is not None and digest != str(expected).lower():
            raise ValueError(f"{path} is damaged or was replaced: its {algorithm} hash is {digest}, {index_path} "
                             f"says {expected}; download it again")
        if digest is None and algorithm not in _UNCHECKED:
            _UNCHECKED.add(algorithm)
            logger.warning("%s lists %s hashes, which this machine cannot compute (pip install xxhash): the shards "
                           "are imported unchecked against them", index_path, algorithm)


def _shard_bytes(index_path: Path, shard: dict) -> tuple[Path, bytes]:
    if shard.get("format", "mds") != "mds":
        raise ValueError(f"{index_path}: shard format {shard.get('format')!r} is not 'mds'")
    compressed = shard.get("zip_data")
    listed = compressed or shard["raw_data"]
    path = index_path.parent / listed["basename"]
    if not path.exists():
        raise FileNotFoundError(f"{index_path} lists {listed['basename']}, which is missing: not found: {path}")
    data = path.read_bytes()
    expected = listed.get("bytes")
    if expected is not None and len(data) != expected:
        raise ValueError(f"{path} has {len(data)} bytes but {index_path} says {expected}: the shard is "
                         "truncated or was replaced; download it again")
    _check_hashes(path, data, listed, index_path)
    if compressed:
        data = _decompress(shard.get("compression"), data, path)
        _check_hashes(path, data, shard["raw_data"] or {}, index_path)  # the hashes of the decompressed shard
    return path, data


def _shard_samples(path: Path, data: bytes, shard: dict) -> Iterator[dict]:
    """Decode every sample of one (uncompressed) shard, checking its header against its size."""
    names, encodings = shard["column_names"], shard["column_encodings"]
    sizes = shard.get("column_sizes") or [_fixed_size(e) for e in encodings]
    broken = f"{path} is truncated or corrupt"
    if len(data) < 4:
        raise ValueError(f"{broken} ({len(data)} bytes: no sample count); download it again")
    num_samples = int(np.frombuffer(data, np.uint32, count=1)[0])
    if num_samples != shard.get("samples", num_samples) or 4 * (num_samples + 2) > len(data):
        raise ValueError(f"{broken}: its header says {num_samples} samples, the index {shard.get('samples')}; "
                         "download it again")
    offsets = np.frombuffer(data, np.uint32, count=num_samples + 1, offset=4).astype(np.int64)
    if np.any(np.diff(offsets) < 0) or offsets[-1] != len(data):
        raise ValueError(f"{broken}: its sample offsets end at byte {offsets[-1]} of {len(data)}; download it again")
    for number, (begin, end) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        sample = memoryview(data)[begin:end]
        try:
            position, column_sizes = 0, []
            for size in sizes:
                if size is None:
                    size = int(np.frombuffer(sample, np.uint32, count=1, offset=position)[0])
                    position += 4
                column_sizes.append(size)
            if position + sum(column_sizes) != len(sample):
                raise ValueError(f"column sizes add up to {position + sum(column_sizes)} bytes, the sample has "
                                 f"{len(sample)}")
            record = {}
            for name, encoding, size in zip(names, encodings, column_sizes):
                record[name] = decode_column(encoding, bytes(sample[position:position + size]))
                position += size
        except (ValueError, KeyError, IndexError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} sample {number}: cannot decode it ({error})") from error
        yield record


def iter_shard_samples(index_path: Path, shard: dict) -> Iterator[tuple[str, dict]]:
    """Yield ("SHARD sample N", sample dict) for every sample of one shard listed by `index_path`."""
    path, data = _shard_bytes(index_path, shard)
    for number, record in enumerate(_shard_samples(path, data, shard)):
        yield f"{path} sample {number}", record


def iter_mds_samples(root: str | os.PathLike, index_files: list[Path] | None = None
                     ) -> Iterator[tuple[str, dict]]:
    """Yield ("SHARD sample N", sample dict) for every sample of every shard, each exactly once, in index order."""
    for index_path in index_files if index_files is not None else select_index_files(root):
        for shard in read_index(index_path):
            yield from iter_shard_samples(index_path, shard)


def sample_to_row(record: dict, default_domain: str, where: str) -> dict:
    if "input_ids" not in record:
        raise ValueError(f"{where}: MDS sample has no `input_ids` column (columns: {sorted(record)})")
    input_ids = np.asarray(record["input_ids"]).reshape(-1)
    if input_ids.size and int(input_ids.max()) > np.iinfo(np.int32).max:
        raise ValueError(f"{where}: token id {int(input_ids.max())} does not fit int32")
    length = len(input_ids)
    spans = np.array([[0, length]]) if record.get("indices") is None else np.asarray(record["indices"])
    if spans.size % 2:
        raise ValueError(f"{where}: `indices` must be [start, end) pairs, got shape {spans.shape}")
    spans = spans.reshape(-1, 2).astype(np.int64)
    if len(spans) == 0 and length == 0:
        spans = np.zeros((0, 2), np.int64)
    contiguous = len(spans) and spans[0, 0] == 0 and spans[-1, 1] == length and np.all(spans[1:, 0] == spans[:-1, 1])
    if length and not (contiguous and np.all(spans[:, 1] > spans[:, 0])):
        raise ValueError(f"{where}: `indices` do not cover [0, {length}) with contiguous non-empty spans")
    row = {"input_ids": input_ids.astype(np.int32), "indices": spans.astype(np.int32),
           "domain": record.get("domain") or default_domain}
    if "mask" in record:
        row["mask"] = np.asarray(record["mask"]).reshape(-1).astype(np.int8)
        if len(row["mask"]) != length:
            raise ValueError(f"{where}: `mask` has {len(row['mask'])} values for {length} tokens")
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


def import_mds(mds_dir: str | os.PathLike, out_dir: str | os.PathLike, *, mode: str | None = None,
               domain: str | None = None, tokenizer=None, source_tokenizer=None, document_length: int | None = None,
               eos_token: str | None = None, overwrite: bool = False, rows_per_write: int = 64) -> dict:
    """Convert the MDS shards under `mds_dir` into packed datasets; returns the metadata written.

    Every sample is imported exactly once whatever folder is given (see `select_index_files`).
    One domain (a folder with an index.json, a domain folder of worker folders, a worker folder)
    becomes one packed dataset at `out_dir`. A root of several domain folders (ProLong's
    `prolong-data-64K/`) becomes one packed dataset per domain, `out_dir/<domain folder>`, since a
    recipe's mixture weights domains by directory; the return value is then {domain: metadata}.

    `domain` is used for samples without a `domain` column (default: the domain folder's name).
    Without `tokenizer` the ids are kept as they are, `mode` (default long) and `source_tokenizer` (the
    name of the tokenizer that made them) are recorded. With `tokenizer` (a name or a loaded tokenizer)
    every document span is re-tokenized from `source_tokenizer` (default: Llama-3's, the release's) to
    it and packed again at the rows' length with the domain's rules, `mode` (default auto: each domain's
    found in its first rows): long, one document per row or, with `document_length` (default: the
    span length of a first row of equal spans), D-token documents; short, concatenated.
    """
    if mode is None:
        mode = "long" if tokenizer is None or document_length is not None else "auto"
    if mode not in MODES + ("auto",) or mode == "auto" and tokenizer is None:
        raise ValueError(f"--mode must be one of {MODES}" + (", or auto with --tokenizer" if mode == "auto" else "")
                         + f", got {mode!r}")
    if document_length is not None and mode != "long":
        raise ValueError(f"--document_length applies to --mode long only (got --mode {mode}); leave it out")
    if tokenizer is None and (document_length is not None or eos_token is not None):
        raise ValueError("--document_length and --eos_token apply to re-tokenization: give the target --tokenizer "
                         "(without it the data is imported as it is, its rows unchanged)")
    if tokenizer is not None and mode == "sft":
        raise ValueError("--tokenizer re-tokenizes long and short data; SFT data has loss masks that text cannot "
                         "carry: tokenize the conversations again with `prolong-data tokenize` and pack --mode sft")
    owned = {"fmt": "prolong-packed", "inputs": [mds_dir]}
    plan = plan_domains(mds_dir)
    check_output_dir(out_dir, overwrite=overwrite, **owned)  # before any shard is read
    if domain and None not in plan:
        raise ValueError(f"--domain {domain!r} would name every domain of {mds_dir} alike ({', '.join(plan)}); "
                         "leave it out (each domain is named after its folder) or import one domain folder")
    if tokenizer is not None:
        from .retokenize import import_retokenized, load_retokenizer

        retokenizer = load_retokenizer(tokenizer, source_tokenizer, eos_token)  # a target without EOS: refused
        return import_retokenized(mds_dir, out_dir, plan, mode=mode, domain=domain, retokenizer=retokenizer,
                                  document_length=document_length, overwrite=overwrite)
    options = {"mode": mode, "tokenizer": source_tokenizer, "rows_per_write": rows_per_write}
    if None in plan:
        with atomic_output_dir(out_dir, overwrite=overwrite, **owned) as tmp:
            metadata = _import_domain(plan[None], tmp, domain=domain or default_domain(Path(mds_dir)),
                                      source=Path(mds_dir), **options)
        return metadata
    logger.info("%s holds %d domains (%s): writing one packed dataset per domain under %s",
                mds_dir, len(plan), ", ".join(plan), out_dir)
    with atomic_output_dir(out_dir, overwrite=overwrite, **owned) as tmp:
        result = {}
        for name, index_files in plan.items():
            (tmp / name).mkdir()
            result[name] = _import_domain(index_files, tmp / name, domain=name, source=Path(mds_dir) / name,
                                          **options)
    return result


def _import_domain(index_files: list[Path], out: Path, *, mode: str, domain: str, tokenizer, source: Path,
                   rows_per_write: int) -> dict:
    shards = [shard for path in index_files for shard in read_index(path)]
    total = sum(shard.get("samples", 0) for shard in shards)
    with_mask = any("mask" in shard["column_names"] for shard in shards)
    lengths: set[int] = set()
    span_lengths: set[int] = set()
    domain_tokens: dict[str, int] = {}
    num_rows = 0
    writer = ShardedDatasetWriter(out, packed_features(with_mask))
    pending: list[dict] = []
    for where, record in tqdm(iter_mds_samples(source, index_files), total=total, unit="seq",
                              desc=f"import-mds {domain}"):
        row = sample_to_row(record, domain, where)
        lengths.add(len(row["input_ids"]))
        if mode == "long" and len(span_lengths) < 2:  # two lengths: not one document length
            span_lengths.update(np.diff(row["indices"], axis=1).ravel().tolist())
        domain_tokens[row["domain"]] = domain_tokens.get(row["domain"], 0) + len(row["input_ids"])
        pending.append(row)
        num_rows += 1
        if len(pending) >= rows_per_write:
            writer.write(_rows_to_table(pending, with_mask))
            pending = []
    if pending:
        writer.write(_rows_to_table(pending, with_mask))
    writer.close()
    if not num_rows:
        raise ValueError(f"{source}: its MDS index lists no samples; nothing to import")
    if len(lengths) > 1 and mode != "sft":
        logger.warning("%s: imported rows have %d different lengths (%d..%d); recording the largest",
                       domain, len(lengths), min(lengths), max(lengths))
    # long rows made of D-token documents (ProLong's `book-65536` at 512K): every span has D tokens
    spans_of_one_length = len(span_lengths) == 1 and min(span_lengths) < max(lengths)
    metadata = {
        "format": "prolong-packed",
        "version": FORMAT_VERSION,
        "mode": mode,
        "length": max(lengths),
        "document_length": min(span_lengths) if spans_of_one_length else None,
        "row_lengths": [min(lengths), max(lengths)],  # equal unless the shards mix lengths (warned above)
        "num_sequences": num_rows,
        "num_tokens": sum(domain_tokens.values()),
        "domains": dict(sorted(domain_tokens.items())),
        "tokenizer": tokenizer if isinstance(tokenizer, str) or tokenizer is None else tokenizer.name_or_path,
        "created_by": created_by(),
        "source": f"mds:{source.absolute()}",
    }
    write_metadata(out, metadata)
    return metadata
