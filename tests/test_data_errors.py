"""Bad input and failures: clear errors or logged skip counts, never a half-written output
presented as complete."""

import errno
import json
import logging
import os
import shutil
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
from prolong.data.mds import import_mds
from prolong.data.tokenize import tokenize_dataset, tokenize_to_disk

REPO = Path(__file__).parents[1]
MDS_BOOKS = REPO / "tests" / "fixtures" / "mds" / "released" / "books"
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


# ---------------------------------------------------------------------------------------------
# Bad data input as a user types it: one clear message naming the file/field and the fix, no
# traceback, exit 2, nothing written at --out. `{d}` is a scratch folder holding the inputs made by
# `bad_inputs` (and the working directory, with a `demo_data/` folder). docs/bad-inputs.md lists
# these cases and their messages.
# ---------------------------------------------------------------------------------------------

def tok(*inputs, tokenizer="{d}/tokenizer", extra=()):
    return ["tokenize", *inputs, "--tokenizer", tokenizer, *extra]


def pack(source, mode="short", length="8", extra=()):
    return ["pack", source, "--mode", mode, "--length", length, *extra]


DATA_CASES = [
    ("tokenize-input-missing", tok("{d}/nope.jsonl"), "input not found: {d}/nope.jsonl"),
    ("tokenize-tokenizer-dot-path", tok("{d}/good.jsonl", tokenizer="./nope"), "not found: ./nope"),
    ("tokenize-tokenizer-local-typo", tok("{d}/good.jsonl", tokenizer="demo_data/tokenizr"),
     "not found: demo_data/tokenizr"),
    ("tokenize-gguf-file-missing", tok("{d}/good.jsonl", extra=("--gguf_file", "model.gguf")),
     "--gguf_file: not found: {d}/tokenizer/model.gguf"),
    ("tokenize-no-inputs", tok(), "give input files"),
    ("tokenize-jsonl-not-utf8", tok("{d}/latin1.jsonl"), "{d}/latin1.jsonl"),
    ("tokenize-jsonl-binary", tok("{d}/binary.jsonl"), "could not read {d}/binary.jsonl"),
    ("tokenize-jsonl-empty", tok("{d}/empty.jsonl"), "{d}/empty.jsonl is empty"),
    ("tokenize-jsonl-invalid", tok("{d}/invalid.jsonl"), "could not read {d}/invalid.jsonl as json"),
    ("tokenize-text-field-missing-in-a-row", tok("{d}/missing_field.jsonl"),
     "{d}/missing_field.jsonl row 2: field 'text' is missing"),
    ("tokenize-text-field-not-a-string", tok("{d}/number_text.jsonl"),
     "{d}/number_text.jsonl row 1: field 'text' is not a string"),
    ("tokenize-text-field-mixed-types", tok("{d}/mixed_text.jsonl"),
     "{d}/mixed_text.jsonl row 2: field 'text' is not a string"),
    ("tokenize-chat-turn-without-role", tok("{d}/chat_no_role.jsonl", extra=("--text_field", "messages")),
     "{d}/chat_no_role.jsonl row 2, turn 1: a chat turn needs string 'role' and 'content'"),
    ("tokenize-chat-without-assistant", tok("{d}/chat_no_assistant.jsonl", tokenizer="{d}/tokenizer_chat",
                                            extra=("--text_field", "messages")),
     "no conversation of field 'messages' has an assistant turn"),
    ("tokenize-chat-template-raises", tok("{d}/chat_two_users.jsonl", tokenizer="{d}/tokenizer_strict_chat",
                                          extra=("--text_field", "messages")),
     "the chat template of tokenizer {d}/tokenizer_strict_chat failed on a conversation"),
    ("tokenize-wrong-text-field", tok("{d}/good.jsonl", extra=("--text_field", "body")), "no field 'body'"),
    ("tokenize-saved-dataset-null-text", tok("{d}/saved_nulls"), "{d}/saved_nulls row 3: field 'text' is missing"),
    ("tokenize-saved-dataset-empty", tok("{d}/saved_empty"), "input directory {d}/saved_empty holds an empty dataset (no rows)"),
    ("tokenize-only-binary-txt", tok("{d}/binary.txt"), "not UTF-8 text: {d}/binary.txt"),
    ("tokenize-only-empty-txt", tok("{d}/empty.txt"), "no document to tokenize"),
    ("tokenize-directory-not-a-dataset", tok("{d}/plain_dir"), "is a directory but not a saved dataset"),
    ("tokenize-tokenizer-without-eos", tok("{d}/good.jsonl", tokenizer="{d}/tokenizer_no_eos"), "--eos_token"),
    ("tokenize-num-proc-0", tok("{d}/good.jsonl", extra=("--num_proc", "0")), "--num_proc"),
    ("tokenize-single-repo-without-repos", tok("{d}/good.jsonl", extra=("--single_repo",)), "--single_repo"),
    ("tokenize-lines-with-repos", tok(extra=("--repos", "{d}/plain_dir", "--lines")), "--lines applies to"),
    ("tokenize-repos-missing", tok(extra=("--repos", "{d}/no_repos")), "--repos directory not found: {d}/no_repos"),
    ("pack-input-missing", pack("{d}/nope"), "--input directory not found: {d}/nope"),
    ("pack-packed-directory", pack("{d}/packed", length="16"), "is already packed"),
    ("pack-long-nothing-long-enough", pack("{d}/tok", mode="long", length="4096"),
     "no document of {d}/tok has 4096 tokens or more"),
    ("pack-short-corpus-below-one-row", pack("{d}/tok", length="1000000"), "less than one row"),
    ("pack-sft-every-conversation-too-long", pack("{d}/tok", mode="sft", length="2"), "give a larger --length"),
    ("pack-length-0", pack("{d}/tok", length="0"), "--length must be a positive"),
    ("pack-length-negative", pack("{d}/tok", length="-8"), "--length must be a positive"),
    ("pack-min-length-in-short-mode", pack("{d}/tok", extra=("--min_length", "4")), "--min_length applies to --mode long"),
    ("pack-truncated-arrow", pack("{d}/truncated"), "{d}/truncated/data-00000-of-00001.arrow"),
    ("pack-mds-directory", pack("{d}/mds_truncated"), "holds MDS shards (index.json): convert them with"),
    ("tokenize-csv-without-text-column", tok("{d}/table.csv"), "input {d}/table.csv has no field 'text'"),
    ("pack-directory-not-a-dataset", pack("{d}/plain_dir"), "not a dataset saved with save_to_disk"),
    ("pack-dataset-without-domain", pack("{d}/raw_saved"), "no `domain` column"),
    ("pack-output-exists", pack("{d}/tok", extra=("--out", "{d}/packed")), "--overwrite"),
    ("pack-output-is-a-file", pack("{d}/tok", extra=("--out", "{d}/a-file")), "already exists"),
    ("inspect-truncated-arrow", ["inspect", "{d}/truncated"], "{d}/truncated/data-00000-of-00001.arrow"),
    ("inspect-folder-of-domains", ["inspect", "{d}/domains"], "but holds datasets (books, fineweb-edu, thestackv1_concat_by_repo-65536; e.g. one per domain)"),
    ("inspect-missing", ["inspect", "{d}/nope"], "not found: {d}/nope"),
    ("import-mds-missing", ["import-mds", "{d}/nope"], "not found: {d}/nope"),
    ("import-mds-no-index", ["import-mds", "{d}/plain_dir"], "no index.json in {d}/plain_dir"),
    ("import-mds-truncated-shard", ["import-mds", "{d}/mds_truncated"], "{d}/mds_truncated/proc00-0/shard.00001.mds"),
    ("import-mds-arrow-dir", ["import-mds", "{d}/tok"], "no index.json"),
]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad-data")
    tiny_tokenizer().save_pretrained(d / "tokenizer")
    tiny_tokenizer(eos=False).save_pretrained(d / "tokenizer_no_eos")
    chat_tokenizer = tiny_tokenizer()
    chat_tokenizer.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    chat_tokenizer.save_pretrained(d / "tokenizer_chat")
    chat_tokenizer.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                                    "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
                                    "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}")  # as Llama-2's does
    chat_tokenizer.save_pretrained(d / "tokenizer_strict_chat")
    (d / "demo_data").mkdir()
    (d / "good.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:20]))
    (d / "latin1.jsonl").write_bytes(json.dumps({"text": "caf\u00e9"}).encode("latin-1").replace(b"\\u00e9", b"\xe9") + b"\n")
    (d / "binary.jsonl").write_bytes(bytes(range(256)) * 8)
    (d / "empty.jsonl").write_bytes(b"")
    (d / "invalid.jsonl").write_text('{"text": "a"}\n{"text": \n')
    (d / "missing_field.jsonl").write_text('{"text": "a b"}\n{"body": "c"}\n{"text": "d"}\n')
    (d / "number_text.jsonl").write_text('{"text": 42}\n{"text": 7}\n')
    (d / "mixed_text.jsonl").write_text('{"text": "a b"}\n{"text": 7}\n')
    chat = [{"role": "user", "content": "lorem ipsum"}, {"role": "assistant", "content": "dolor"}]
    (d / "chat_no_role.jsonl").write_text(json.dumps({"messages": chat}) + "\n"
                                          + json.dumps({"messages": [{"content": "x"}] + chat[1:]}) + "\n")
    (d / "chat_two_users.jsonl").write_text(json.dumps({"messages": chat[:1] + chat}) + "\n")
    (d / "chat_no_assistant.jsonl").write_text(json.dumps({"messages": chat[:1]}) + "\n")
    (d / "table.csv").write_text("id,body\n1,hello world\n")
    (d / "binary.txt").write_bytes(b"\x00\x01\x02binary" * 100)
    (d / "empty.txt").write_bytes(b"")
    (d / "plain_dir").mkdir()
    (d / "plain_dir" / "notes.txt").write_text("hello\n")
    (d / "a-file").write_text("not a directory\n")
    datasets.Dataset.from_dict({"text": ["a", "b", None, "c"]}).save_to_disk(str(d / "saved_nulls"))
    datasets.Dataset.from_dict({"text": []}).save_to_disk(str(d / "saved_empty"))
    datasets.Dataset.from_dict({"input_ids": [[1, 2, 3]] * 4}).save_to_disk(str(d / "raw_saved"))
    tokenize_to_disk(datasets.Dataset.from_dict({"text": TEXTS}), tiny_tokenizer(), d / "tok", domain="d")
    pack_dataset(d / "tok", d / "packed", mode="short", length=16)
    shutil.copytree(d / "tok", d / "truncated")
    arrow = d / "truncated" / "data-00000-of-00001.arrow"
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    import_mds(MDS_BOOKS.parent, d / "domains")  # one packed dataset per domain
    shutil.copytree(MDS_BOOKS, d / "mds_truncated")
    shard = d / "mds_truncated" / "proc00-0" / "shard.00001.mds"
    shard.write_bytes(shard.read_bytes()[:-10])
    return d


@pytest.mark.parametrize("argv, fragment", [pytest.param(argv, fragment, id=case_id)
                                            for case_id, argv, fragment in DATA_CASES])
def test_bad_data_input_is_refused_clearly(request, bad_inputs, monkeypatch, capsys, argv, fragment):
    monkeypatch.chdir(bad_inputs)
    out = bad_inputs / f"out-{request.node.callspec.id}"
    argv = [arg.replace("{d}", str(bad_inputs)) for arg in argv]
    if "--out" not in argv and argv[0] != "inspect":
        argv += ["--out", str(out)]
    before = sorted(p.name for p in bad_inputs.iterdir())
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert fragment.replace("{d}", str(bad_inputs)) in err, err
    assert sorted(p.name for p in bad_inputs.iterdir()) == before  # no output, no temporary left


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
