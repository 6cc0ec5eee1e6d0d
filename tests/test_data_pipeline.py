"""prolong.data end to end on real tokenizers and real datasets on disk: tokenize -> pack -> inspect."""

import json
import random

import datasets
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from prolong.data import best_fit_decreasing, pack_dataset, read_metadata
from prolong.data.cli import main
from prolong.data.storage import longest_row
from prolong.data.tokenize import tokenize_dataset, tokenize_to_disk

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hum old songs".split()
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def make_texts(n, seed=0, max_words=400):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words))) for _ in range(n)]


def train_tokenizer(eos=True):
    model = Tokenizer(models.BPE(unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["[UNK]", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    model.train_from_iterator(make_texts(200, seed=1) + ["user assistant system \n"],
                              trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    from tokenizers import decoders
    model.decoder = decoders.ByteLevel()
    kwargs = {"eos_token": "</s>"} if eos else {}
    return PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", unk_token="[UNK]",
                                   chat_template=CHATML, **kwargs)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return path


def expected_docs(tokenizer, texts):
    return [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]


def global_span_starts(rows, length):
    return [r * length + start for r, row in enumerate(rows) for start, _ in row["indices"]]


def check_spans(row):
    spans = row["indices"]
    assert spans[0][0] == 0 and spans[-1][1] == len(row["input_ids"])
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])) and all(e > s for s, e in spans)


@pytest.fixture(scope="module")
def tokenized_dir(tmp_path_factory, tokenizer):
    # empty documents to be skipped, 200 in a row so that whole tokenizer batches are empty
    texts = make_texts(300) + ["", "   \n"] + [""] * 198
    out = tmp_path_factory.mktemp("tok") / "web"
    metadata = tokenize_to_disk(datasets.Dataset.from_dict({"text": texts}), tokenizer, out, domain="web")
    assert metadata["skipped"]["empty_documents"] == 200
    return out, expected_docs(tokenizer, texts[:300])


def test_tokenize_format(tokenized_dir):
    out, docs = tokenized_dir
    ds = datasets.load_from_disk(str(out))
    assert ds.features["input_ids"].feature.dtype == "int32"
    assert ds["input_ids"] == docs  # no BOS: this tokenizer does not add one; EOS last
    assert ds["length"] == [len(d) for d in docs] and set(ds["domain"]) == {"web"}
    assert read_metadata(out)["num_tokens"] == sum(map(len, docs))


@pytest.mark.parametrize("chunk_rows", [7, 4096])  # 7: the carry crosses many chunk boundaries
def test_short_mode_keeps_every_token_once(tmp_path, tokenized_dir, chunk_rows):
    source, docs = tokenized_dir
    length = 37
    metadata = pack_dataset(source, tmp_path / "short", mode="short", length=length, chunk_rows=chunk_rows)
    rows = datasets.load_from_disk(str(tmp_path / "short")).to_list()
    stream = np.concatenate(docs)
    num_rows = len(stream) // length
    assert len(rows) == num_rows == metadata["num_sequences"]
    assert all(len(row["input_ids"]) == length for row in rows)
    assert np.array_equal(np.concatenate([row["input_ids"] for row in rows]), stream[:num_rows * length])
    assert metadata["dropped_tokens"] == len(stream) - num_rows * length < length
    # A span starts at every document start and at every row start: the documents, exactly.
    doc_starts = np.cumsum([0] + [len(d) for d in docs])[:-1]
    expected = sorted(set(doc_starts[doc_starts < num_rows * length]) | set(range(0, num_rows * length, length)))
    assert global_span_starts(rows, length) == expected
    for row in rows:
        check_spans(row)
    assert metadata["domains"] == {"web": num_rows * length}
    assert "mask" not in rows[0]


def test_long_mode_cuts_long_documents(tmp_path, tokenized_dir):
    source, docs = tokenized_dir
    length, min_length = 64, 128
    metadata = pack_dataset(source, tmp_path / "long", mode="long", length=length, min_length=min_length,
                            chunk_rows=13)
    rows = datasets.load_from_disk(str(tmp_path / "long")).to_list()
    expected = [d[k * length:(k + 1) * length] for d in docs if len(d) >= min_length
                for k in range(len(d) // length)]
    assert [row["input_ids"] for row in rows] == expected
    assert all(row["indices"] == [[0, length]] for row in rows)
    assert metadata["dropped_documents"] == sum(len(d) < min_length for d in docs) > 0
    assert metadata["num_tokens"] == len(expected) * length


def test_longest_row_counts_only_the_rows_a_select_kept():
    """run_cpt's packed-length check and run_sft's card read it; SFT data drops conversations with select."""
    rows = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4] * 7, [5]]})
    assert longest_row(rows) == 7
    assert longest_row(rows.select([0, 2])) == 3  # dataset.data still holds the 7-token row
    assert longest_row(rows.filter(lambda row: len(row["input_ids"]) < 5)) == 3
    assert longest_row(rows.select([])) == 0


def test_best_fit_decreasing_is_tight():
    bins = best_fit_decreasing(np.array([6, 5, 4, 3, 2]), 10)
    assert sorted(np.bincount(bins, weights=[6, 5, 4, 3, 2]).tolist()) == [10, 10]


def conversations(n, seed=0):
    rng = random.Random(seed)
    chats = []
    for i in range(n):
        turns = [{"role": "user", "content": f"question {i} " + " ".join(rng.choices(WORDS, k=rng.randint(1, 30)))}]
        turns.append({"role": "assistant", "content": "ANSWER " + " ".join(rng.choices(WORDS, k=rng.randint(1, 60)))})
        chats.append(turns)
    return chats


def test_sft_mode_never_splits_conversations_and_keeps_masks(tmp_path, tokenizer):
    chats = conversations(120)
    chats[::30] = [[{"role": "user", "content": "long " * 10}, {"role": "assistant", "content": "x y " * 400}]] * 4
    raw = datasets.Dataset.from_dict({"messages": chats})
    tokenized, _ = tokenize_dataset(raw, tokenizer, text_field="messages", domain="chat")
    docs = {tuple(ids): tuple(mask) for ids, mask in zip(tokenized["input_ids"], tokenized["mask"])}
    # The mask covers exactly the assistant turns.
    first_ids, first_mask = tokenized[0]["input_ids"], tokenized[0]["mask"]
    assistant_text = tokenizer.decode([t for t, m in zip(first_ids, first_mask) if m])
    assert assistant_text.startswith(chats[0][1]["content"]) and "question" not in assistant_text
    length = 300
    metadata = pack_dataset(tokenized, tmp_path / "sft", mode="sft", length=length, chunk_rows=5)
    rows = datasets.load_from_disk(str(tmp_path / "sft")).to_list()
    seen = []
    for row in rows:
        check_spans(row)
        assert len(row["input_ids"]) <= length and len(row["mask"]) == len(row["input_ids"])
        for start, end in row["indices"]:
            piece = tuple(row["input_ids"][start:end])
            assert docs[piece] == tuple(row["mask"][start:end])  # a whole conversation, with its mask
            seen.append(piece)
    fitting = [ids for ids in tokenized["input_ids"] if len(ids) <= length]
    assert sorted(seen) == sorted(map(tuple, fitting))
    assert metadata["dropped_documents"] == len(tokenized) - len(fitting) > 0
    lower_bound = -(-sum(map(len, fitting)) // length)
    assert lower_bound <= len(rows) <= lower_bound * 11 / 9 + 1  # best-fit-decreasing's worst-case ratio


def test_cli_tokenize_files_repos_and_inspect(tmp_path, tokenizer_dir, capsys):
    data = tmp_path / "raw"
    data.mkdir()
    (data / "a.jsonl").write_text("\n".join(json.dumps({"content": t}) for t in make_texts(20) + [""]) + "\n")
    (data / "good.txt").write_text("a plain text document about a fox")
    (data / "bad.txt").write_bytes(b"caf\xe9 latin-1 bytes")  # not UTF-8
    assert main(["tokenize", str(data / "a.jsonl"), "--text_field", "content", "--tokenizer", str(tokenizer_dir),
                 "--out", str(tmp_path / "tok_json"), "--domain", "web", "--num_proc", "2"]) == 0
    assert read_metadata(tmp_path / "tok_json")["skipped"]["empty_documents"] == 1
    assert len(datasets.load_from_disk(str(tmp_path / "tok_json"))) == 20
    assert main(["tokenize", str(data / "good.txt"), str(data / "bad.txt"), "--tokenizer", str(tokenizer_dir),
                 "--out", str(tmp_path / "tok_txt")]) == 0
    metadata = read_metadata(tmp_path / "tok_txt")
    assert metadata["num_documents"] == 1 and metadata["skipped"]["unreadable_documents"] == 1
    assert metadata["domains"] == {"tok_txt": metadata["num_tokens"]}  # domain defaults to the output name

    repos = tmp_path / "repos"
    (repos / "alpha" / "pkg").mkdir(parents=True)
    (repos / "alpha" / "pkg" / "b.py").write_text("print('b')\n")
    (repos / "alpha" / "a.py").write_text("print('a')\n")
    (repos / "alpha" / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0binary")
    (repos / "beta").mkdir()
    (repos / "beta" / "README.md").write_text("# beta\n")
    assert main(["tokenize", "--repos", str(repos), "--tokenizer", str(tokenizer_dir),
                 "--out", str(tmp_path / "tok_code"), "--domain", "code_repos"]) == 0
    metadata = read_metadata(tmp_path / "tok_code")
    assert metadata["num_documents"] == 2 and metadata["skipped"]["binary_or_non_utf8_files"] == 1
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    first = tok.decode(datasets.load_from_disk(str(tmp_path / "tok_code"))[0]["input_ids"])
    assert first == "a.py\nprint('a')\n\n\npkg/b.py\nprint('b')\n</s>"  # sorted, path header per file

    assert main(["pack", str(tmp_path / "tok_json"), "--mode", "short", "--length", "32",
                 "--out", str(tmp_path / "packed")]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "tok_json"), str(tmp_path / "packed"), "--json"]) == 0
    tokenized_summary, packed_summary = json.loads(capsys.readouterr().out)
    assert tokenized_summary["num_documents"] == 20 and tokenized_summary["kind"] == "prolong-tokenized"
    assert packed_summary["row_lengths"] == [32] and packed_summary["mode"] == "short"
    assert packed_summary["num_tokens"] == read_metadata(tmp_path / "packed")["num_tokens"]
    assert main(["inspect", str(tmp_path / "packed")]) == 0
    assert "tokens per domain" in capsys.readouterr().out


@pytest.mark.parametrize("subset", ["select", "split", "concatenated"])
def test_packing_a_subset_of_a_saved_dataset_packs_exactly_that_subset(subset, tmp_path):
    """Contiguous selections slice the Arrow files without an index mapping, and a concatenation
    with an in-memory dataset lists only its files: neither may be read as the whole files."""
    saved = datasets.Dataset.from_dict({"input_ids": [[i] * 10 for i in range(100)], "domain": ["x"] * 100})
    saved.save_to_disk(str(tmp_path / "in"))
    loaded = datasets.load_from_disk(str(tmp_path / "in"))
    extra = datasets.Dataset.from_dict({"input_ids": [[7] * 10] * 50, "domain": ["y"] * 50})
    part = {
        "select": lambda: loaded.select(range(10)),
        "split": lambda: loaded.train_test_split(test_size=0.2, shuffle=False)["test"],
        "concatenated": lambda: datasets.concatenate_datasets([loaded, extra]),
    }[subset]()
    metadata = pack_dataset(part, tmp_path / "out", mode="short", length=10)
    assert metadata["num_tokens"] == 10 * len(part)
    packed = datasets.load_from_disk(str(tmp_path / "out"))
    assert sorted(tok for row in packed["input_ids"] for tok in row) == sorted(t for row in part["input_ids"] for t in row)


def test_csv_rows_are_documents(tmp_path, tokenizer, tokenizer_dir):
    # a .csv was read as ONE plain-text document (header and commas included)
    (tmp_path / "t.csv").write_text('id,text\n1,the quick fox\n2,"a lazy dog, old songs"\n')
    assert main(["tokenize", str(tmp_path / "t.csv"), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "tok")]) == 0
    assert datasets.load_from_disk(str(tmp_path / "tok"))["input_ids"] == expected_docs(
        tokenizer, ["the quick fox", "a lazy dog, old songs"])
