"""import-mds on shards written by mosaicml-streaming's own MDSWriter + merge_index in ProLong's
released layout (tests/fixtures/mds, see its README), and on shards written byte for byte like it
(streaming/base/format/mds/writer.py and encodings.py) for the encodings the fixtures do not use."""

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest

from prolong.data import read_metadata
from prolong.data.cli import main
from prolong.data.mds import decode_column, import_mds

_DTYPE_CODES = {"uint8": 8, "int8": 9, "uint32": 32, "int32": 33, "int64": 65}


def encode_ndarray(array, dtype_in_encoding):
    """NDArray encoding: [dtype byte if dynamic] [ndim<<2 | shape dtype] [shape] [values]."""
    parts = [] if dtype_in_encoding else [bytes([_DTYPE_CODES[array.dtype.name]])]
    shape = np.array(array.shape, np.int64)
    shape_dtype, code = ("uint8", 0) if shape.max() < 256 else ("uint16", 1) if shape.max() < 65536 else ("uint32", 2)
    parts += [bytes([(array.ndim << 2) | code]), shape.astype(shape_dtype).tobytes(), array.tobytes()]
    return b"".join(parts)


def write_mds(directory, samples, columns, compression=None, samples_per_shard=3):
    """A minimal MDSWriter: sorted columns, joint shards, index.json (version 2)."""
    directory.mkdir(parents=True)
    names = sorted(columns)
    encodings = [columns[n] for n in names]
    sizes = [None] * len(names)  # every column used here is variable-size
    config = {"column_encodings": encodings, "column_names": names, "column_sizes": sizes,
              "compression": compression, "format": "mds", "hashes": [], "size_limit": 1 << 26, "version": 2}
    config_data = json.dumps(config, sort_keys=True).encode()
    shards = []
    for first in range(0, len(samples), samples_per_shard):
        encoded = []
        for sample in samples[first:first + samples_per_shard]:
            data = []
            for name, encoding in zip(names, encodings):
                value = sample[name]
                data.append(value.encode() if encoding == "str" else encode_ndarray(value, encoding != "ndarray"))
            encoded.append(np.array([len(d) for d in data], np.uint32).tobytes() + b"".join(data))
        count = np.uint32(len(encoded))
        offsets = np.array([0] + [len(e) for e in encoded]).cumsum().astype(np.uint32)
        offsets += len(count.tobytes()) + len(offsets.tobytes()) + len(config_data)
        raw = count.tobytes() + offsets.tobytes() + config_data + b"".join(encoded)
        raw_name = f"shard.{len(shards):05}.mds"
        zip_info = None
        if compression:
            zipped = gzip.compress(raw)
            zip_info = {"basename": raw_name + ".gz", "bytes": len(zipped), "hashes": {}}
            (directory / zip_info["basename"]).write_bytes(zipped)
        else:
            (directory / raw_name).write_bytes(raw)
        shard = {"samples": len(encoded), "raw_data": {"basename": raw_name, "bytes": len(raw), "hashes": {}},
                 "zip_data": zip_info}
        shard.update(config)
        shards.append(shard)
    (directory / "index.json").write_text(json.dumps({"version": 2, "shards": shards}, sort_keys=True))


def prolong_like_samples(n, length, seed=0):
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        cuts = np.sort(rng.choice(np.arange(1, length), size=i % 4, replace=False))
        bounds = np.concatenate([[0], cuts, [length]])
        samples.append({"input_ids": rng.integers(0, 128_000, length).astype(np.uint32),
                        "indices": np.stack([bounds[:-1], bounds[1:]], axis=1).astype(np.uint32),
                        "domain": "books" if i % 2 else "thestackv1_concat_by_repo-65536"})
    return samples


@pytest.mark.parametrize("compression", [None, "gz"])
def test_import_mds_round_trip(tmp_path, compression):
    samples = prolong_like_samples(7, 64)
    write_mds(tmp_path / "mds", samples, {"input_ids": "ndarray:uint32", "indices": "ndarray:uint32",
                                          "domain": "str"}, compression=compression)
    assert main(["import-mds", str(tmp_path / "mds"), "--out", str(tmp_path / "packed")]) == 0
    rows = datasets.load_from_disk(str(tmp_path / "packed")).to_list()
    assert len(rows) == 7
    for row, sample in zip(rows, samples):
        assert row["input_ids"] == sample["input_ids"].astype(np.int64).tolist()
        assert row["indices"] == sample["indices"].astype(np.int64).tolist()
        assert row["domain"] == sample["domain"]
    metadata = read_metadata(tmp_path / "packed")
    assert metadata["format"] == "prolong-packed" and metadata["length"] == 64 and metadata["num_tokens"] == 7 * 64
    assert metadata["domains"] == {"books": 3 * 64, "thestackv1_concat_by_repo-65536": 4 * 64}


def test_import_mds_nested_dirs_dynamic_dtype_and_mask(tmp_path):
    # ProLong ships one MDS folder per domain; samples without `domain` take the folder's name.
    samples = [{"input_ids": np.arange(10, dtype=np.int64), "mask": np.array([0] * 4 + [1] * 6, np.uint8)}]
    write_mds(tmp_path / "mds" / "tulu", samples, {"input_ids": "ndarray", "mask": "ndarray"})
    metadata = import_mds(tmp_path / "mds", tmp_path / "packed", mode="sft")  # a root of domains: packed/<domain>
    row = datasets.load_from_disk(str(tmp_path / "packed" / "tulu"))[0]
    assert row == {"input_ids": list(range(10)), "indices": [[0, 10]], "domain": "tulu", "mask": [0] * 4 + [1] * 6}
    assert metadata["tulu"]["mode"] == "sft"


def test_import_mds_rejects_bad_spans_and_leaves_no_output(tmp_path):
    samples = [{"input_ids": np.arange(8, dtype=np.uint32), "indices": np.array([[0, 3], [4, 8]], np.uint32),
                "domain": "x"}]
    write_mds(tmp_path / "mds", samples, {"input_ids": "ndarray:uint32", "indices": "ndarray:uint32", "domain": "str"})
    with pytest.raises(ValueError, match="indices"):
        import_mds(tmp_path / "mds", tmp_path / "packed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mds"]


def test_decode_fixed_shape_ndarray_and_missing_index(tmp_path):
    assert decode_column("ndarray:int32:2,2", np.arange(4, dtype=np.int32).tobytes()).tolist() == [[0, 1], [2, 3]]
    assert decode_column("int", np.int64(-5).tobytes()) == -5
    with pytest.raises(FileNotFoundError, match="index.json"):
        import_mds(tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="not found: .*missing"):
        import_mds(tmp_path / "missing", tmp_path / "out")


FIXTURES = Path(__file__).parent / "fixtures" / "mds"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
RELEASED_DOMAINS = ["books", "fineweb-edu", "thestackv1_concat_by_repo-65536"]


def rows_of(directory):
    return [{k: row[k] for k in ("input_ids", "indices", "domain")}
            for row in datasets.load_from_disk(str(directory)).to_list()]


def test_released_layout_imports_every_sample_once_at_every_level(tmp_path, capsys):
    released = FIXTURES / "released"
    # the root (no index.json of its own; each domain has a merged index AND per-worker indexes):
    # one packed dataset per domain, each sample once, in streaming's own order
    assert main(["import-mds", str(released), "--out", str(tmp_path / "all")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert sorted(printed) == RELEASED_DOMAINS
    for domain in RELEASED_DOMAINS:
        assert rows_of(tmp_path / "all" / domain) == EXPECTED[f"released/{domain}"]
        assert read_metadata(tmp_path / "all" / domain)["num_sequences"] == len(EXPECTED[f"released/{domain}"])
    assert sum(len(datasets.load_from_disk(str(tmp_path / "all" / d))) for d in RELEASED_DOMAINS) == 23
    # one domain folder, and one worker folder of it
    assert main(["import-mds", str(released / "books"), "--out", str(tmp_path / "books")]) == 0
    assert rows_of(tmp_path / "books") == EXPECTED["released/books"]
    assert main(["import-mds", str(released / "books" / "proc01-0"), "--out", str(tmp_path / "worker")]) == 0
    assert rows_of(tmp_path / "worker") == EXPECTED["released/books"][5:]  # proc00-0 wrote the first 5
    assert read_metadata(tmp_path / "worker")["domains"] == {"books": 4 * 32}
    # --domain over several domains would give them one name: refused, naming them
    assert main(["import-mds", str(released), "--domain", "x", "--out", str(tmp_path / "x")]) == 2
    assert "books, fineweb-edu, thestackv1_concat_by_repo-65536" in capsys.readouterr().err


def test_merged_index_missing_a_worker_still_imports_it_once(tmp_path, capsys):
    # a worker folder added after merge_index ran: its own index is used, the others' are covered
    books = tmp_path / "books"
    shutil.copytree(FIXTURES / "released" / "books", books)
    index = json.loads((books / "index.json").read_text())
    index["shards"] = [s for s in index["shards"] if s["raw_data"]["basename"].startswith("proc00-0/")]
    (books / "index.json").write_text(json.dumps(index))
    assert main(["import-mds", str(books), "--out", str(tmp_path / "out")]) == 0
    assert rows_of(tmp_path / "out") == EXPECTED["released/books"]
    # a merged index listing only part of a worker's shards: the indexes disagree, refused
    index["shards"] = index["shards"][:1]
    (books / "index.json").write_text(json.dumps(index))
    assert main(["import-mds", str(books), "--out", str(tmp_path / "out2")]) == 2
    assert "stale" in (err := capsys.readouterr().err) and "merge_index" in err
    assert not (tmp_path / "out2").exists()


def test_zstd_shards_are_read(tmp_path):
    assert main(["import-mds", str(FIXTURES / "zstd" / "books"), "--out", str(tmp_path / "out")]) == 0
    assert rows_of(tmp_path / "out") == EXPECTED["zstd/books"]


def test_zstd_without_zstandard_is_refused_with_the_install_line(tmp_path):
    # as a user whose environment lacks the package: the real CLI in a process where it cannot be imported
    code = ("import sys; sys.modules['zstandard'] = None; from prolong.data.cli import main; sys.exit(main())")
    run = subprocess.run([sys.executable, "-c", code, "import-mds", str(FIXTURES / "zstd"), "--out",
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])))
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "proc00-0/shard.00000.mds.zstd" in run.stderr and "pip install zstandard" in run.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage-header", "index-truncated"])
def test_damaged_shards_and_indexes_name_the_file(tmp_path, capsys, damage):
    books = tmp_path / "books"
    shutil.copytree(FIXTURES / "released" / "books", books)
    shard = books / "proc00-0" / "shard.00001.mds"
    data = shard.read_bytes()
    if damage == "truncated":
        shard.write_bytes(data[: len(data) // 2])
        culprit = shard
    elif damage == "garbage-header":  # same size, but not a shard
        shard.write_bytes(b"\xff" * len(data))
        culprit = shard
    else:
        text = (books / "index.json").read_text()
        (books / "index.json").write_text(text[: len(text) // 2])
        culprit = books / "index.json"
    assert main(["import-mds", str(books), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(culprit) in err and ("truncated" in err or "corrupt" in err), err
    assert not (tmp_path / "out").exists()
