"""Failures of prolong-data: clear errors or logged skip counts, never a half-written output presented as
complete. Each bad input as typed (one message, exit 2, nothing written) is a case of tests/test_bad_inputs.py."""

import errno
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
from datasets.arrow_writer import ArrowWriter
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from prolong.data import pack_dataset
from prolong.data.cli import main
from prolong.data.tokenize import tokenize_dataset, tokenize_to_disk

REPO = Path(__file__).parents[1]
TEXTS = [f"document {i} " + "lorem ipsum dolor sit amet " * (i % 17 + 1) for i in range(200)]


def tiny_tokenizer(eos=True):
    model = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    model.train_from_iterator(TEXTS, trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]", **({"eos_token": "</s>"} if eos else {}))


@pytest.fixture
def tokenized(tmp_path):
    out = tmp_path / "tok"
    tokenize_to_disk(datasets.Dataset.from_dict({"text": TEXTS}), tiny_tokenizer(), out, domain="d")
    return out


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_disk_full_while_packing_leaves_no_output(tmp_path, tokenized, monkeypatch, capsys):
    original, calls, fail_at_call = ArrowWriter.write_table, [], [3]

    def write_table_until_disk_full(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at_call[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ArrowWriter, "write_table", write_table_until_disk_full)
    with pytest.raises(OSError, match="No space left"):
        pack_dataset(tokenized, tmp_path / "packed", mode="short", length=16, chunk_rows=10)
    assert not (tmp_path / "packed").exists() and leftovers(tmp_path) == []
    calls.clear()
    fail_at_call[0] = 1  # the CLI packs this small corpus in one write
    code = main(["pack", str(tokenized), "--mode", "short", "--length", "16", "--out", str(tmp_path / "packed")])
    assert code == 2 and "No space left on device" in capsys.readouterr().err
    assert not (tmp_path / "packed").exists() and leftovers(tmp_path) == []
    monkeypatch.undo()
    pack_dataset(tokenized, tmp_path / "packed", mode="short", length=16)  # a clean re-run succeeds
    assert len(datasets.load_from_disk(str(tmp_path / "packed"))) > 0


def test_failure_after_tokenized_data_is_written_leaves_no_output(tmp_path, monkeypatch):
    def save_then_fail(self, *args, **kwargs):
        original_save(self, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    original_save = datasets.Dataset.save_to_disk
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", save_then_fail)
    with pytest.raises(OSError):
        tokenize_to_disk(datasets.Dataset.from_dict({"text": TEXTS}), tiny_tokenizer(), tmp_path / "tok")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_existing_output_is_refused_unless_overwrite(tmp_path, tokenized, capsys):
    args = ["pack", str(tokenized), "--mode", "long", "--length", "8", "--out", str(tmp_path / "packed")]
    assert main(args) == 0
    first = json.loads((tmp_path / "packed" / "prolong_data.json").read_text())
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(args[:-2] + ["--length", "4", "--out", str(tmp_path / "packed"), "--overwrite"]) == 0
    second = json.loads((tmp_path / "packed" / "prolong_data.json").read_text())
    assert (first["length"], second["length"]) == (8, 4) and leftovers(tmp_path) == []


def test_tokenizer_without_eos_is_refused_unless_eos_token_given():
    raw = datasets.Dataset.from_dict({"text": TEXTS[:3]})
    with pytest.raises(ValueError, match="--eos_token"):
        tokenize_dataset(raw, tiny_tokenizer(eos=False))
    tokenized, _ = tokenize_dataset(raw, tiny_tokenizer(eos=False), eos_token="</s>")
    assert all(ids[-1] == 1 for ids in tokenized["input_ids"])
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        tokenize_dataset(raw, tiny_tokenizer(eos=False), eos_token="<nope>")


def test_missing_text_field_and_missing_directories(tmp_path, tokenized, capsys):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    tokenizer_dir = tmp_path / "tokenizer"
    tiny_tokenizer().save_pretrained(tokenizer_dir)
    base = ["--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "out")]
    assert main(["tokenize", str(tmp_path / "a.jsonl")] + base) == 2
    assert "no field 'text'" in (err := capsys.readouterr().err) and "--text_field" in err and "body" in err
    assert main(["tokenize", str(tmp_path / "missing.jsonl")] + base) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["tokenize", "--repos", str(tmp_path / "no_repos")] + base) == 2
    assert "--repos directory" in capsys.readouterr().err
    assert main(["pack", str(tmp_path / "nothing"), "--mode", "short", "--length", "8", "--out", str(tmp_path / "p")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["pack", str(tmp_path), "--mode", "short", "--length", "8", "--out", str(tmp_path / "p")]) == 2
    assert "not a dataset saved with save_to_disk" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "p").exists() and leftovers(tmp_path) == []


def test_empty_and_non_utf8_documents_are_counted_and_logged(tmp_path, caplog):
    (tmp_path / "docs.txt").write_bytes(b"first line\n\n   \nsecond \xff\xfe line\nthird line\n")
    tokenizer_dir = tmp_path / "tokenizer"
    tiny_tokenizer().save_pretrained(tokenizer_dir)
    with caplog.at_level(logging.WARNING, logger="prolong.data"):
        assert main(["tokenize", str(tmp_path / "docs.txt"), "--lines", "--tokenizer", str(tokenizer_dir),
                     "--out", str(tmp_path / "tok")]) == 0
    metadata = json.loads((tmp_path / "tok" / "prolong_data.json").read_text())
    assert metadata["num_documents"] == 2
    assert metadata["skipped"] == {"unreadable_documents": 1, "empty_documents": 2}
    assert "skipped 1 item(s): unreadable documents" in caplog.text and "skipped 2 item(s): empty documents" in caplog.text


def test_bad_pack_arguments(tmp_path, tokenized):
    with pytest.raises(ValueError, match="--length"):
        pack_dataset(tokenized, tmp_path / "p", mode="short", length=0)
    with pytest.raises(ValueError, match="--mode"):
        pack_dataset(tokenized, tmp_path / "p", mode="wrapped", length=8)
    assert not (tmp_path / "p").exists()


def test_pack_of_a_packed_directory_is_refused_in_a_real_process(tmp_path, tokenized):
    # a second `pack` on a packed directory took each row as one document: its spans were merged
    source = tmp_path / "packed"
    pack_dataset(tokenized, source, mode="short", length=16)
    run = subprocess.run([sys.executable, "-m", "prolong.data", "pack", str(source), "--mode", "short",
                          "--length", "32", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                         timeout=120, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(
        f"prolong-data pack: error: {source} is already packed (short mode, length 16): packing it again would "
        "merge the documents of each row into one"), run.stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.slow
def test_killed_tokenize_leaves_no_unreported_cache(tmp_path, caplog):
    tiny_tokenizer().save_pretrained(tmp_path / "tokenizer")
    with open(tmp_path / "big.jsonl", "w") as f:
        for i in range(40_000):
            f.write(json.dumps({"text": TEXTS[i % len(TEXTS)]}) + "\n")
    out = ["--tokenizer", str(tmp_path / "tokenizer"), "--out", str(tmp_path / "tok")]
    run = subprocess.Popen([sys.executable, "-m", "prolong.data", "tokenize", str(tmp_path / "big.jsonl"), *out],
                           cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:  # kill it once datasets has started writing into its scratch cache
        while run.poll() is None and not any(any(p.iterdir()) for p in tmp_path.glob(".tok.cache-*")):
            time.sleep(0.01)
        run.kill()
    finally:
        run.wait()
    assert run.returncode == -9, "tokenize finished before it could be killed: make the input larger"
    assert leftovers(tmp_path)  # the killed run's scratch cache
    (tmp_path / "small.jsonl").write_text(json.dumps({"text": TEXTS[0]}) + "\n")
    with caplog.at_level(logging.WARNING, logger="prolong.data"):
        assert main(["tokenize", str(tmp_path / "small.jsonl"), *out]) == 0  # the next run into the same --out
    assert leftovers(tmp_path) == [] and "left by an interrupted run" in caplog.text


def test_tokenizing_a_saved_dataset_writes_nothing_into_it(tmp_path):
    tiny_tokenizer().save_pretrained(tmp_path / "tokenizer")
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(tmp_path / "raw"))
    before = sorted(p.name for p in (tmp_path / "raw").iterdir())
    assert main(["tokenize", str(tmp_path / "raw"), "--tokenizer", str(tmp_path / "tokenizer"),
                 "--out", str(tmp_path / "tok")]) == 0
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == before  # no datasets cache-*.arrow left
    assert leftovers(tmp_path) == []
