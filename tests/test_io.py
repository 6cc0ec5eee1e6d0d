"""prolong.io: the one reader of raw files, chat turns, Hub ids / paths and tokenizers that
`prolong-data`, SFT, training and evaluation share, so each answers a name the same way."""

from __future__ import annotations

import gzip
import json

import pytest
import zstandard
from datasets import Dataset

from conftest import train_tiny_tokenizer
from prolong.config import ModelConfig
from prolong.data import cli
from prolong.data.sources import load_raw_inputs
from prolong.errors import ExpectedError, RecipeError, cli_errors
from prolong.io.hub import parse_hf_dataset_address, require_path_or_hub_id
from prolong.model import load_tokenizer as recipe_tokenizer
from prolong.model_card import dataset_tokens, hub_dataset_ids
from prolong.sft_data import SFTDataError, load_sft_dataset, prepare_sft_dataset

CHATS = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}
         for i in range(3)]


@pytest.fixture
def offline(monkeypatch):
    """No Hub in tests: huggingface_hub's own offline mode (what HF_HUB_OFFLINE=1 sets)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _write_chats(path, rows):
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("ending", [".jsonl.gz", ".jsonl.zst"])
def test_sft_reads_compressed_chat_files_as_prolong_data_does(tmp_path, ending):
    plain = load_sft_dataset(str(_write_chats(tmp_path / "chats.jsonl", CHATS)))
    compressed = str(_write_chats(tmp_path / f"chats{ending}", CHATS))
    assert load_sft_dataset(compressed)["messages"] == plain["messages"] == [row["messages"] for row in CHATS]
    assert load_raw_inputs([compressed], text_field="messages")["messages"] == plain["messages"]


def test_an_unknown_chat_role_is_refused_by_prolong_data_and_sft_alike(tmp_path):
    """Before, prolong-data tokenized a `human` turn as it was (SFT refused it)."""
    rows = [{"messages": [{"role": "human", "content": "the"}, {"role": "gpt", "content": "of"}]}]
    path = str(_write_chats(tmp_path / "roles.jsonl", rows))
    with pytest.raises(ValueError, match=r"roles.jsonl row 1, turn 1: unknown role 'human'; roles are system, user"):
        load_raw_inputs([path], text_field="messages")
    with pytest.raises(SFTDataError, match=r"row 0, turn 0: unknown role 'human'; roles are system, user"):
        prepare_sft_dataset(Dataset.from_list(rows), train_tiny_tokenizer(), 64)


def test_a_name_that_is_no_hub_id_is_not_found_by_every_loader(tmp_path, monkeypatch, offline, capsys):
    """`missing/tokenizer.json`: prolong-data sent it to the Hub as a repository id, training said
    "not found"; now both say "not found" at once (a data-file ending is no Hub id)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "doc.txt").write_text("some text\n")
    name = "missing/tokenizer.json"
    assert cli.main(["tokenize", "doc.txt", "--tokenizer", name, "--out", "out"]) == 2
    assert f"prolong-data tokenize: error: --tokenizer: not found: {name}." in capsys.readouterr().err
    with pytest.raises(RecipeError, match=f"^model_name_or_path: not found: {name}\\. Fix the path"):
        recipe_tokenizer(ModelConfig(model_name_or_path=name))
    assert not (tmp_path / "out").exists()


def test_huggingface_hub_decides_whether_a_hub_id_can_be_used(tmp_path, monkeypatch, offline):
    import huggingface_hub.constants

    with pytest.raises(RecipeError, match=r"model_name_or_path: not found: org/name \(no such local path; as a Hub "
                                          r"id it is not in the local cache and HF_HUB_OFFLINE is set\)\. Fix it\."):
        require_path_or_hub_id("org/name", "model_name_or_path", hint="Fix it.")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    (tmp_path / "datasets--org--name").mkdir()  # downloaded before: usable offline
    require_path_or_hub_id("org/name", "dataset_name", repo_type="dataset")
    with pytest.raises(RecipeError, match="not in the local cache"):
        require_path_or_hub_id("org/name", "model_name_or_path")  # a model of that name was never downloaded
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()  # `org` is a local folder: org/name is a typo of a path, not a Hub id
    with pytest.raises(RecipeError, match=r"^dataset_name: not found: org/name\.$"):
        require_path_or_hub_id("org/name", "dataset_name", repo_type="dataset")


@pytest.mark.parametrize("text, parts", [
    ("hf://datasets/org/name", ("org/name", None, None)),
    ("hf://datasets/org/name/web/", ("org/name", None, "web")),
    ("hf://datasets/org/name@v1.0/web", ("org/name", "v1.0", "web")),
    ("hf://datasets/org/name/web/extra", None),  # no such address: resolve_dataset_dir refuses it too
    ("hf://datasets/org", None),
    ("org/name", None),
])
def test_one_parser_of_hub_dataset_addresses(text, parts):
    address = parse_hf_dataset_address(text)
    assert (address and (address.repo_id, address.revision, address.config)) == parts
    assert hub_dataset_ids({text: 1.0}) == ([parts[0]] if parts else [])  # the model card's dataset ids


def test_the_model_card_counts_tokens_from_the_metadata_file(tmp_path):
    (tmp_path / "prolong_data.json").write_text(json.dumps({"num_tokens": 1234}))
    assert dataset_tokens(str(tmp_path)) == 1234
    assert dataset_tokens("hf://datasets/org/never-downloaded/web") == 0


def test_every_cli_reports_an_expected_error_in_one_line_and_keeps_a_bug_s_traceback(capsys):
    class MissingPackage(ExpectedError):
        pass

    @cli_errors("prog")
    def main(error):
        raise error

    with pytest.raises(SystemExit) as exit:
        main(MissingPackage("install zstandard"))
    assert exit.value.code == 2 and capsys.readouterr().err == "prog: error: install zstandard\n"
    with pytest.raises(RuntimeError, match="a bug"):
        main(RuntimeError("a bug"))
