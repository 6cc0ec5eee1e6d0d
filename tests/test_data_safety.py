"""prolong-data and SFT data never lose, damage or silently reuse the user's files (issue 25, data side):
`--overwrite` replaces only a previous output of the same command, MDS shard hashes are checked, empty
files and byte order marks never become text, outputs follow the umask, huge documents are tokenized
in bounded pieces, SFT's caches go to scratch space, content parts are accepted, and every parse or
type mismatch names its file. Everything through the real CLI (`prolong-data`'s main, in process) on
real files, with tokenizers trained on the fly."""

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import bpe_tokenizer, train_tiny_tokenizer
from prolong.data.cli import main

REPO = Path(__file__).parents[1]
MDS_BOOKS = REPO / "tests" / "fixtures" / "mds" / "released" / "books"
TEXTS = [{"text": "the of and to in is that " * (i + 3)} for i in range(40)]


def jsonl(path, rows):
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    train_tiny_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def byte_tok_dir(tmp_path_factory):
    """A byte-level BPE whose alphabet holds every byte: a BOM would become tokens, not vanish."""
    path = tmp_path_factory.mktemp("byte-tok")
    corpus = ["the of and to in is that for it as with was on be by this are from"] * 50
    bpe_tokenizer(corpus, 400, ["<eos>"], byte_alphabet=True, eos_token="<eos>").save_pretrained(path)
    return str(path)


@pytest.fixture
def tokenized(tmp_path, tok_dir):
    assert main(["tokenize", jsonl(tmp_path / "docs.jsonl", TEXTS), "--tokenizer", tok_dir,
                 "--out", str(tmp_path / "tok")]) == 0
    return tmp_path / "tok"


# ---------------------------------------------------------------------------------------------
# 1. --overwrite replaces only a previous output of the same command


def _setup_overwrite(case, d, tok_dir):
    """(argv, the folder that must come out unchanged, a fragment of the message) of one case."""
    docs = jsonl(d / "docs.jsonl", TEXTS)
    tok = str(d / "tok")
    if case != "tokenize-into-its-input-folder":
        assert main(["tokenize", docs, "--tokenizer", tok_dir, "--out", tok]) == 0
    pack = ["pack", tok, "--mode", "short", "--length", "16"]
    if case == "tokenize-into-its-input-folder":
        (d / "notes.md").write_text("mine")
        return ["tokenize", docs, "--tokenizer", tok_dir, "--out", str(d), "--overwrite"], d, "holds the input"
    if case == "pack-out-is-its-input":
        return pack + ["--out", tok, "--overwrite"], d / "tok", "is the input"
    if case == "pack-out-inside-its-input":
        return pack + ["--out", f"{tok}/packed"], d / "tok", "inside the input"
    if case == "pack-input-inside-out":
        root = d / "root"
        root.mkdir()
        shutil.move(tok, root / "tok")
        return ["pack", str(root / "tok"), "--mode", "short", "--length", "16", "--out", str(root), "--overwrite"], \
            root, "holds the input"
    if case == "pack-over-a-foreign-folder":
        (d / "mine").mkdir()
        (d / "mine" / "thesis.tex").write_text("years of work")
        return pack + ["--out", str(d / "mine"), "--overwrite"], d / "mine", "thesis.tex"
    if case == "pack-over-a-file":
        (d / "report.pdf").write_text("precious")
        return pack + ["--out", str(d / "report.pdf"), "--overwrite"], d, "is a file"
    if case == "tokenize-over-a-packed-output":
        assert main(pack + ["--out", str(d / "packed")]) == 0
        return ["tokenize", docs, "--tokenizer", tok_dir, "--out", str(d / "packed"), "--overwrite"], d / "packed", \
            "holds a prolong-packed output"
    if case == "pack-over-its-output-with-a-user-file":
        assert main(pack + ["--out", str(d / "packed")]) == 0
        (d / "packed" / "my-notes.txt").write_text("notes")
        return pack + ["--out", str(d / "packed"), "--overwrite"], d / "packed", "my-notes.txt"
    if case == "import-mds-out-is-its-input":
        shutil.copytree(MDS_BOOKS, d / "books")
        return ["import-mds", str(d / "books"), "--out", str(d / "books"), "--overwrite"], d / "books", "is the input"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["tokenize-into-its-input-folder", "pack-out-is-its-input", "pack-out-inside-its-input",
                                  "pack-input-inside-out", "pack-over-a-foreign-folder", "pack-over-a-file",
                                  "tokenize-over-a-packed-output", "pack-over-its-output-with-a-user-file",
                                  "import-mds-out-is-its-input"])
def test_overwrite_never_deletes_what_is_not_a_previous_output_of_the_command(case, tmp_path, tok_dir, capsys):
    argv, kept, fragment = _setup_overwrite(case, tmp_path, tok_dir)
    capsys.readouterr()
    before = snapshot(kept)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err and err.startswith(f"prolong-data {argv[0]}: error: "), err
    assert snapshot(kept) == before
    assert not [p.name for p in Path(tmp_path).rglob(".*tmp-*")]  # no temporary folder left


def test_overwrite_still_replaces_a_previous_output_and_an_empty_folder(tmp_path, tokenized):
    pack = ["pack", str(tokenized), "--mode", "short", "--length"]
    assert main(pack + ["16", "--out", str(tmp_path / "packed")]) == 0
    assert main(pack + ["8", "--out", str(tmp_path / "packed"), "--overwrite"]) == 0  # its README.md card too
    assert json.loads((tmp_path / "packed" / "prolong_data.json").read_text())["length"] == 8
    (tmp_path / "empty").mkdir()
    assert main(pack + ["8", "--out", str(tmp_path / "empty"), "--overwrite"]) == 0
    # a folder of outputs (import-mds of several domains) is replaced whole
    released = str(MDS_BOOKS.parent)
    assert main(["import-mds", released, "--out", str(tmp_path / "mds")]) == 0
    assert main(["import-mds", released, "--out", str(tmp_path / "mds"), "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "mds").iterdir()) == ["README.md", "books", "fineweb-edu",
                                                                     "thestackv1_concat_by_repo-65536"]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_outputs_follow_the_umask(tmp_path, tok_dir, umask):
    old = os.umask(umask)
    try:
        docs = jsonl(tmp_path / "docs.jsonl", TEXTS)
        assert main(["tokenize", docs, "--tokenizer", tok_dir, "--out", str(tmp_path / "tok")]) == 0
        assert main(["pack", str(tmp_path / "tok"), "--mode", "short", "--length", "16", "--out",
                     str(tmp_path / "packed")]) == 0
        assert main(["import-mds", str(MDS_BOOKS), "--out", str(tmp_path / "mds")]) == 0
    finally:
        os.umask(old)
    for name in ("tok", "packed", "mds"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o777 & ~umask, name
        for file in (tmp_path / name).iterdir():
            assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask, file


def test_pack_length_1_is_refused_and_tokenize_does_not_warn_about_its_own_scratch(tmp_path, tok_dir, capsys,
                                                                                   caplog):
    docs = jsonl(tmp_path / "docs.jsonl", TEXTS)
    assert main(["tokenize", docs, "--tokenizer", tok_dir, "--out", str(tmp_path / "tok")]) == 0
    assert "temporary dir of another run" not in caplog.text and "left by an interrupted run" not in caplog.text
    for flags in (["--mode", "short", "--length", "1"], ["--mode", "long", "--length", "4", "--min_length", "1"]):
        assert main(["pack", str(tmp_path / "tok"), *flags, "--out", str(tmp_path / "p")]) == 2
        assert "2 or more" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


# ---------------------------------------------------------------------------------------------
# 2. MDS shard hashes


def _with_hashes(src, dst, algorithms):
    shutil.copytree(src, dst)
    for index in [dst / "index.json", *dst.glob("proc*/index.json")]:
        data = json.loads(index.read_text())
        for shard in data["shards"]:
            raw = (index.parent / shard["raw_data"]["basename"]).read_bytes()
            for algorithm in algorithms:
                if algorithm.startswith("xxh"):
                    import xxhash
                    digest = getattr(xxhash, algorithm)(raw).hexdigest()
                else:
                    digest = hashlib.new(algorithm, raw).hexdigest()
                shard["raw_data"]["hashes"][algorithm] = digest
        index.write_text(json.dumps(data))
    return dst


@pytest.mark.parametrize("algorithm, shard", [("sha1", "proc00-0/shard.00001.mds"), ("xxh64", "proc01-0/shard.00000.mds"),
                                              ("sha256", "proc00-0/shard.00000.mds")])
def test_a_shard_whose_hash_disagrees_with_index_json_is_refused(tmp_path, capsys, algorithm, shard):
    books = _with_hashes(MDS_BOOKS, tmp_path / "books", [algorithm])
    assert main(["import-mds", str(books), "--out", str(tmp_path / "intact")]) == 0  # the hashes are right
    data = bytearray((books / shard).read_bytes())
    data[-20] ^= 0x01  # one token id changed: same size, still decodes
    (books / shard).write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["import-mds", str(books), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(books / shard) in err and f"its {algorithm} hash is" in err and "download it again" in err, err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# 4. empty files and byte order marks


def _decoded(out, tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return [tokenizer.decode(ids) for ids in datasets.load_from_disk(str(out))["input_ids"]]


def test_repositories_drop_empty_files_and_empty_repositories_with_a_count(tmp_path, byte_tok_dir, caplog):
    repos = tmp_path / "repos"
    (repos / "code").mkdir(parents=True)
    (repos / "code" / "__init__.py").write_text("")
    (repos / "code" / "core.py").write_text("def f():\n    return 1\n")
    (repos / "hollow").mkdir()
    (repos / "hollow" / "__init__.py").write_text("")
    (repos / "hollow" / "blank.txt").write_text("  \n\n")
    assert main(["tokenize", "--repos", str(repos), "--tokenizer", byte_tok_dir, "--out", str(tmp_path / "out")]) == 0
    metadata = json.loads((tmp_path / "out" / "prolong_data.json").read_text())
    assert metadata["num_documents"] == 1
    assert metadata["skipped"] == {"empty_files": 3, "empty_documents": 1}
    [text] = _decoded(tmp_path / "out", byte_tok_dir)
    assert "__init__.py" not in text and text.startswith("core.py\ndef f():")
    assert "skipped 3 item(s): empty files" in caplog.text and "skipped 1 item(s): empty documents" in caplog.text


@pytest.mark.parametrize("kind", ["text-file", "jsonl-file", "jsonl-field", "repository-file", "lines"])
def test_a_byte_order_mark_never_becomes_text(tmp_path, byte_tok_dir, kind):
    bom = "\ufeff"
    if kind == "text-file":
        (tmp_path / "doc.txt").write_text(bom + "the of and to", encoding="utf-8")
        argv = [str(tmp_path / "doc.txt")]
    elif kind == "lines":
        (tmp_path / "doc.txt").write_text(bom + "the of\nand to\n", encoding="utf-8")
        argv = [str(tmp_path / "doc.txt"), "--lines"]
    elif kind == "jsonl-file":  # Windows tools write a BOM at the start of the file
        (tmp_path / "doc.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "the of and"}).encode() + b"\n")
        argv = [str(tmp_path / "doc.jsonl")]
    elif kind == "jsonl-field":  # a text field read from such a file by another tool
        argv = [jsonl(tmp_path / "doc.jsonl", [{"text": bom + "the of and"}, {"text": "to in is"}])]
    else:
        (tmp_path / "repos" / "pkg").mkdir(parents=True)
        (tmp_path / "repos" / "pkg" / "a.py").write_text(bom + "the = 1\n", encoding="utf-8")
        (tmp_path / "repos" / "pkg" / "b.py").write_text(bom + "of = 2\n", encoding="utf-8")
        argv = ["--repos", str(tmp_path / "repos")]
    assert main(["tokenize", *argv, "--tokenizer", byte_tok_dir, "--out", str(tmp_path / "out")]) == 0
    texts = _decoded(tmp_path / "out", byte_tok_dir)
    assert texts and not any(bom in text for text in texts), texts
    assert any("the" in text for text in texts)


# ---------------------------------------------------------------------------------------------
# huge documents: bounded pieces, the same tokens


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_a_huge_document_is_tokenized_in_pieces_with_the_tokens_of_one_call(tmp_path, kind, monkeypatch):
    """A 53 MB jsonl line needed 9.4 GB in one tokenizer call; pieces of PIECE_CHARS characters, cut
    where the tokenizer splits anyway, give the very same ids (shown here with small pieces)."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from prolong.data import tokenize as tokenize_module

    words = "the of and to in is that for it as with was on be by this are from def return class".split()
    rng = random.Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 12))) for _ in range(3000)]
    text = "\n".join("  " * rng.randint(0, 3) + line for line in lines)  # indents, blank lines, runs of spaces
    if kind == "byte-level":
        tokenizer = bpe_tokenizer([text[:20000]], 300, ["<eos>"], eos_token="<eos>")
    else:  # SentencePiece-style (Llama 2): a prefix space is added to the start of each encoded text
        model = Tokenizer(models.BPE(unk_token="<unk>"))
        model.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        model.decoder = decoders.Metaspace(prepend_scheme="first")
        model.train_from_iterator([text[:20000]], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"]))
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>", eos_token="<eos>")
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    calls = []
    original_call = type(tokenizer).__call__

    def spy(self, texts, *args, **kwargs):
        calls.append(max(map(len, texts if isinstance(texts, list) else [texts])))
        return original_call(self, texts, *args, **kwargs)

    monkeypatch.setattr(tokenize_module, "PIECE_CHARS", 4096)
    monkeypatch.setattr(tokenize_module, "_CUT_CONTEXT", 200)
    monkeypatch.setattr(type(tokenizer), "__call__", spy)
    tokenized, _ = tokenize_module.tokenize_dataset(datasets.Dataset.from_dict({"text": [text, "the of"]}), tokenizer,
                                                    cache_dir=str(tmp_path))
    assert tokenized[0]["input_ids"][:-1] == whole  # + EOS
    assert max(calls) <= 4096 and len(text) > 10 * 4096


# ---------------------------------------------------------------------------------------------
# 5. parse errors and mismatched files name the file


def test_a_damaged_prolong_data_json_is_named(tmp_path, tokenized, capsys):
    (tokenized / "prolong_data.json").write_text('{"format": "prolong-tokenized", ')
    assert main(["pack", str(tokenized), "--mode", "short", "--length", "16", "--out", str(tmp_path / "p")]) == 2
    assert main(["inspect", str(tokenized)]) == 2
    err = capsys.readouterr().err
    assert err.count(f"{tokenized / 'prolong_data.json'} is not valid JSON") == 2 and "Traceback" not in err, err


def test_files_of_string_and_large_string_text_are_read_together(tmp_path, tok_dir):
    pq.write_table(pa.table({"text": pa.array(["the of and to"] * 3, pa.large_string())}), tmp_path / "big.parquet")
    small = jsonl(tmp_path / "small.jsonl", TEXTS[:3])
    assert main(["tokenize", small, str(tmp_path / "big.parquet"), str(tmp_path / "small.jsonl"), "--tokenizer",
                 tok_dir, "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "prolong_data.json").read_text())["num_documents"] == 9


@pytest.mark.parametrize("second, fragment", [
    ({"text": "and to", "domain": 7}, "b.jsonl: field 'domain' holds Value('int64') values"),
    ({"text": "and to", "domain": "books", "source": {"nested": 1}}, "disagree on field 'source'"),
])
def test_files_whose_fields_disagree_are_named(tmp_path, tok_dir, capsys, second, fragment):
    first = jsonl(tmp_path / "a.jsonl", [{"text": "the of", "domain": "books", "source": "x"}])
    other = jsonl(tmp_path / "b.jsonl", [second])
    assert main(["tokenize", first, other, "--tokenizer", tok_dir, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err, err


def test_openai_content_parts_are_tokenized_like_strings(tmp_path, tok_dir, capsys):
    plain = [{"messages": [{"role": "user", "content": "the of and"}, {"role": "assistant", "content": "to in\nis"}]}]
    parts = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "the of and"}]},
                           {"role": "assistant", "content": [{"type": "text", "text": "to in"},
                                                             {"type": "text", "text": "is"}]}]}]
    for name, rows in (("plain", plain), ("parts", parts)):
        assert main(["tokenize", jsonl(tmp_path / f"{name}.jsonl", rows), "--text_field", "messages", "--tokenizer",
                     tok_dir, "--out", str(tmp_path / name)]) == 0
    read = lambda name: datasets.load_from_disk(str(tmp_path / name))[:]  # noqa: E731
    assert read("parts")["input_ids"] == read("plain")["input_ids"] and read("parts")["mask"] == read("plain")["mask"]
    image = [{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                           {"role": "assistant", "content": "the"}]}]
    assert main(["tokenize", jsonl(tmp_path / "image.jsonl", image), "--text_field", "messages", "--tokenizer",
                 tok_dir, "--out", str(tmp_path / "image")]) == 2
    err = capsys.readouterr().err
    assert "image.jsonl row 1, turn 1: a content part of type 'image_url'" in err, err


# ---------------------------------------------------------------------------------------------
# SFT data: scratch caches, content parts, files named


def _as_parts(conversations):
    return [{"messages": [{"role": turn["role"], "content": [{"type": "text", "text": turn["content"]}]}
                          for turn in messages]} for messages in conversations]


@pytest.mark.slow
def test_sft_trains_on_a_read_only_saved_dataset_with_content_parts_and_writes_nothing_into_it(tiny_model_dir, tmp_path):
    from helpers import chat_conversations, sft_argv
    from prolong.run_sft import main as run_sft

    folder = tmp_path / "chat"
    datasets.Dataset.from_list(_as_parts(chat_conversations(16))).save_to_disk(str(folder))
    for path in [*folder.iterdir(), folder]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    before = snapshot(folder)
    try:
        out = run_sft(sft_argv(tiny_model_dir, str(folder), str(tmp_path / "sft")))
    finally:
        folder.chmod(0o755)
    assert snapshot(folder) == before  # no cache-*.arrow beside the user's data
    assert (Path(out) / "model.safetensors").exists()


def test_sft_content_parts_give_the_tokens_of_strings_and_bad_files_are_named(tmp_path):
    from helpers import chat_conversations
    from prolong.sft_data import SFTDataError, load_sft_dataset, prepare_sft_dataset

    tokenizer = train_tiny_tokenizer()
    conversations = chat_conversations(6)
    plain = load_sft_dataset(jsonl(tmp_path / "plain.jsonl", [{"messages": c} for c in conversations]))
    parts = load_sft_dataset(jsonl(tmp_path / "parts.jsonl", _as_parts(conversations)))
    assert prepare_sft_dataset(parts, tokenizer, 512)[0][:] == prepare_sft_dataset(plain, tokenizer, 512)[0][:]
    image = [{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                           {"role": "assistant", "content": "the"}]}]
    with pytest.raises(SFTDataError, match=r"row 0, turn 0: a content part of type 'image_url'"):
        prepare_sft_dataset(load_sft_dataset(jsonl(tmp_path / "image.jsonl", image)), tokenizer, 512)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"messages": conversations[0]}) + "\n{not json\n")
    with pytest.raises(SFTDataError, match=f"cannot read {broken}"):
        load_sft_dataset(str(broken))
