"""`prolong-data import-mds --tokenizer`: the release re-tokenized, on MDS shards written by
mosaicml-streaming's own MDSWriter from real tokenizers' ids (tests/fixtures/mds/smollm2 and micro,
see its README): SmolLM2's tokenizer (the demo's) and the micro base's BPE (recipes/tiny/base-model).

The oracle is the tokenizers themselves: every document span decoded with the source and encoded with
the target, then cut and grouped by ProLong's packing rules, must give the output rows exactly, and
each document's target ids must decode to the source's text (mismatches: 0).
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest

from conftest import bpe_tokenizer
from prolong.data import read_metadata
from prolong.data.cli import main
from prolong.data.mds import iter_mds_samples, sample_to_row
from prolong.data.tokenize import load_named_tokenizer as load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "mds"
MICRO = str(Path(__file__).parents[1] / "recipes" / "tiny" / "base-model")
LENGTH = 64


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> str:
    """The demo's SmolLM2 tokenizer (`--tokenizer smollm2`), saved as a plain directory: converting the
    GGUF's vocabulary costs ~5 s, once."""
    path = tmp_path_factory.mktemp("smollm2-tokenizer")
    load_tokenizer("smollm2").save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def source_and_target(smollm2):
    return load_tokenizer(smollm2), load_tokenizer(MICRO)


def source_documents(release: Path, source) -> list[tuple[str, bool]]:
    """(text, ends with EOS) of every document span of the release, in order, decoded with the source."""
    documents = []
    for where, record in iter_mds_samples(release):
        row = sample_to_row(record, "x", where)
        for start, end in row["indices"].tolist():
            ids = row["input_ids"][start:end].tolist()
            eos = ids[-1] == source.eos_token_id
            documents.append((source.decode(ids[:-1] if eos else ids, clean_up_tokenization_spaces=False), eos))
    return documents


def expected_rows(documents, target, mode: str, document_length: int | None = None) -> list[dict]:
    """ProLong's packing of the target's encoding of each document, written out plainly."""
    encoded = [target(text, add_special_tokens=False)["input_ids"] + ([target.eos_token_id] if eos else [])
               for text, eos in documents]
    if mode == "short":
        stream = sum(encoded, [])
        starts = set(np.cumsum([0] + [len(ids) for ids in encoded]).tolist())
        rows = []
        for begin in range(0, len(stream) - LENGTH + 1, LENGTH):
            cuts = sorted({begin} | {s for s in starts if begin < s < begin + LENGTH})
            rows.append({"input_ids": stream[begin:begin + LENGTH],
                         "indices": [[a - begin, b - begin] for a, b in zip(cuts, cuts[1:] + [begin + LENGTH])]})
        return rows
    piece = document_length or LENGTH
    pieces = [ids[i:i + piece] for ids in encoded for i in range(0, len(ids) - piece + 1, piece)]
    per_row = LENGTH // piece
    return [{"input_ids": sum(pieces[r:r + per_row], []), "indices": [[i * piece, (i + 1) * piece] for i in range(per_row)]}
            for r in range(0, len(pieces) - per_row + 1, per_row)]


@pytest.fixture(scope="module")
def retokenized(smollm2, tmp_path_factory) -> Path:
    """The whole SmolLM2 release moved to the micro base's tokenizer in one command, each domain's packing
    found in its rows (no --mode, no --document_length)."""
    out = tmp_path_factory.mktemp("retokenized") / "out"
    assert main(["import-mds", str(FIXTURES / "smollm2"), "--out", str(out), "--tokenizer", MICRO,
                 "--source_tokenizer", smollm2]) == 0
    return out


@pytest.mark.parametrize("domain, mode, document_length", [("books", "long", None), ("book-16", "long", 16),
                                                             ("fineweb-edu", "short", None)])
def test_retokenized_release_is_the_targets_encoding_of_every_document(retokenized, smollm2, source_and_target,
                                                                       domain, mode, document_length):
    source, target = source_and_target
    documents = source_documents(FIXTURES / "smollm2" / domain, source)
    expected = expected_rows(documents, target, mode, document_length)
    rows = datasets.load_from_disk(str(retokenized / domain)).to_list()
    assert [{"input_ids": r["input_ids"], "indices": r["indices"]} for r in rows] == expected and len(rows) >= 5
    assert {r["domain"] for r in rows} == {domain}
    # the round trip: every document's target ids decode to the text its source ids decode to
    mismatches = sum(target.decode(target(text, add_special_tokens=False)["input_ids"],
                                   clean_up_tokenization_spaces=False) != text for text, _ in documents)
    metadata = read_metadata(retokenized / domain)
    assert mismatches == 0 and metadata["round_trip_mismatches"] == 0
    assert domain == "books" or any(not text.isascii() for text, _ in documents)  # accents, CJK, emoji
    assert (metadata["mode"], metadata["length"], metadata["document_length"]) == (mode, LENGTH, document_length)
    assert metadata["tokenizer"] == MICRO and metadata["source_tokenizer"] == smollm2
    assert not list(retokenized.parent.glob(".out.*"))  # the work folder is gone


def test_a_normalising_target_is_counted_as_mismatches(smollm2, tmp_path):
    from tokenizers import normalizers

    target = bpe_tokenizer(["Some Text to learn from."] * 20, 300, ["</s>"], byte_alphabet=True, eos_token="</s>")
    target.backend_tokenizer.normalizer = normalizers.Lowercase()
    target.save_pretrained(tmp_path / "lower")
    assert main(["import-mds", str(FIXTURES / "smollm2" / "fineweb-edu"), "--out", str(tmp_path / "out"), "--mode",
                 "short", "--tokenizer", str(tmp_path / "lower"), "--source_tokenizer", smollm2]) == 0
    assert read_metadata(tmp_path / "out")["round_trip_mismatches"] > 0


def refused(argv, tmp_path, capsys) -> str:
    assert main(argv + ["--out", str(tmp_path / "out")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))) == []  # nothing written
    return capsys.readouterr().err


def test_bad_input_is_refused_with_nothing_written(smollm2, tmp_path, capsys):
    no_eos = bpe_tokenizer(["some text"] * 5, 270, ["<pad>"], byte_alphabet=True, pad_token="<pad>")
    no_eos.save_pretrained(tmp_path / "no-eos")
    error = refused(["import-mds", str(FIXTURES / "smollm2" / "books"), "--tokenizer", str(tmp_path / "no-eos"),
                     "--source_tokenizer", smollm2], tmp_path, capsys)
    assert "has no EOS token" in error and "--eos_token" in error
    # the micro base's ids read as SmolLM2's: text comes out, but not the ids it was made from
    error = refused(["import-mds", str(FIXTURES / "micro" / "book-16"), "--tokenizer", MICRO,
                     "--source_tokenizer", smollm2], tmp_path, capsys)
    assert f"--source_tokenizer {smollm2} does not round-trip the data's ids" in error
    # SmolLM2 needs fewer tokens than the micro BPE: its documents are shorter than the release's 16
    error = refused(["import-mds", str(FIXTURES / "micro" / "book-16"), "--tokenizer", smollm2,
                     "--source_tokenizer", MICRO], tmp_path, capsys)
    assert "fewer than --document_length 16" in error and "give a --document_length" in error


@pytest.mark.slow
def test_a_killed_run_resumes_with_the_shards_it_finished(smollm2, tmp_path, caplog):
    """The run stalls reading the second shard (a named pipe: a stalled network disk) and is killed
    (SIGKILL); the next run takes the first shard's documents as they are and gives the same output."""
    release = tmp_path / "books"
    shutil.copytree(FIXTURES / "smollm2" / "books", release)
    second = release / "proc00-0" / "shard.00001.mds"
    second.unlink()
    os.mkfifo(second)
    argv = ["import-mds", str(release), "--mode", "long", "--tokenizer", MICRO, "--source_tokenizer", smollm2]
    out, work = tmp_path / "out", tmp_path / ".out.retokenize"
    process = subprocess.Popen([sys.executable, "-m", "prolong.data", *argv, "--out", str(out)],
                               cwd=Path(__file__).parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (work / "domain" / "shard-00000.arrow").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert sorted(p.name for p in (work / "domain").glob("*.arrow")) == ["shard-00000.arrow"] and not out.exists()
    second.unlink()
    shutil.copy(FIXTURES / "smollm2" / "books" / "proc00-0" / "shard.00001.mds", second)
    with caplog.at_level("INFO", logger="prolong.data"):
        assert main(argv + ["--out", str(out)]) == 0
    assert "1 of 5 shards already re-tokenized" in caplog.text
    assert main(argv + ["--out", str(tmp_path / "whole")]) == 0  # uninterrupted
    assert datasets.load_from_disk(str(out)).to_list() == datasets.load_from_disk(str(tmp_path / "whole")).to_list()
    assert read_metadata(out)["round_trip_mismatches"] == 0 and not work.exists()
