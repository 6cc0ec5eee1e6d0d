"""`prolong-data push` against a local fake Hub (tests/hub_server.py): the real huggingface_hub
client uploads, the test reads back what arrived, and `load_dataset` on the pushed files gives the
local dataset back, document spans included. Bad input and Hub refusals exit 2 with one line and
commit nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from huggingface_hub import DatasetCard, constants

from conftest import WORDS, train_tiny_tokenizer
from hub_server import FakeHub
from prolong.data import cli

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mixture_root(tmp_path_factory) -> Path:
    """Two packed domains made with the real CLI (tokenize, then pack short at 64 tokens)."""
    import random

    root = tmp_path_factory.mktemp("hubdata")
    tokenizer_dir = root / "tokenizer"
    train_tiny_tokenizer().save_pretrained(tokenizer_dir)
    rng = random.Random(0)
    for domain, count in (("books", 12), ("web", 30)):
        source = root / f"{domain}.jsonl"
        texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 80))) for _ in range(count)]
        source.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
        assert cli.main(["tokenize", str(source), "--tokenizer", str(tokenizer_dir), "--domain", domain,
                         "--out", str(root / "tok" / domain)]) == 0
        assert cli.main(["pack", str(root / "tok" / domain), "--mode", "short", "--length", "64",
                         "--out", str(root / "mix" / domain)]) == 0
    return root


def push_cli(*args: str, hub: FakeHub, token: str | None, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(home),
           "PYTHONPATH": str(REPO)}
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "prolong.data", "push", *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_pack_writes_the_dataset_card_locally(mixture_root):
    card = DatasetCard.load(mixture_root / "mix" / "books" / "README.md")
    assert card.data.license == "other" and "packed" in card.data.tags and "short" in card.data.tags
    assert card.data.configs[0]["data_files"][0]["path"] == "data-*.arrow"
    assert "prolong-data pack" in card.text and "--length 64" in card.text and "| 64 |" in card.text
    rows = len(datasets.load_from_disk(str(mixture_root / "mix" / "books")))
    assert card.data.dataset_info["splits"][0]["num_examples"] == rows


def test_push_mixture_round_trips_through_load_dataset(mixture_root, tmp_path):
    with FakeHub() as hub:
        result = push_cli(str(mixture_root / "mix"), "--repo-id", "my-org/tiny-mix", hub=hub, token=hub.token,
                          home=tmp_path / "home")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["commit_url"].startswith(hub.endpoint)
        assert len(hub.commits) == 1  # one commit: all or nothing
        files = hub.files("my-org/tiny-mix", "dataset")
        assert {"README.md", "books/prolong_data.json", "web/state.json", "web/data-00000-of-00001.arrow"} <= set(files)
        assert any(path.startswith("/lfs-upload/") for _, path in hub.requests)  # the LFS path was used
        clone = hub.write_repo("my-org/tiny-mix", tmp_path / "clone", "dataset")

    card = DatasetCard.load(clone / "README.md")
    configs = {c["config_name"]: c for c in card.data.configs}
    assert set(configs) == {"books", "web"} and configs["books"].get("default") is True
    infos = {i["config_name"]: i for i in card.data.dataset_info}
    for domain in ("books", "web"):
        local = datasets.load_from_disk(str(mixture_root / "mix" / domain))
        meta = json.loads((mixture_root / "mix" / domain / "prolong_data.json").read_text())
        assert infos[domain]["splits"][0]["num_examples"] == len(local)
        assert f"| `{domain}` | packed | short | 64 | {len(local):,} | {meta['num_tokens']:,} |" in card.text
        assert f"--out {mixture_root / 'mix' / domain}" in card.text  # the command that made it
        pushed = datasets.load_dataset(str(clone), domain, split="train", cache_dir=str(tmp_path / "cache"))
        assert pushed.features == local.features
        assert pushed.to_dict() == local.to_dict()  # rows, document spans and domains, in order
    # a downloaded config folder is a load_from_disk directory too
    assert datasets.load_from_disk(str(clone / "web")).to_dict() == datasets.load_from_disk(
        str(mixture_root / "mix" / "web")).to_dict()
    assert "tokenizer" in card.text and "books (" in card.text


def test_push_private_to_a_branch(mixture_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with FakeHub() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", hub.token)
        assert cli.main(["push", str(mixture_root / "mix" / "web"), "--repo-id", "me/web", "--private",
                         "--revision", "v1"]) == 0
        repo = hub.repos[("dataset", "me/web")]
        assert repo["private"] and repo["branches"]["main"] == {}
        assert "web/data-00000-of-00001.arrow" in repo["branches"]["v1"]
        card = DatasetCard(repo["branches"]["v1"]["README.md"].decode())
        assert [c["config_name"] for c in card.data.configs] == ["web"] and card.data.configs[0]["default"]
        # pushing again replaces the config folder: a file of the earlier push does not stay behind
        stale_copy = tmp_path / "again" / "web"
        shutil.copytree(mixture_root / "mix" / "web", stale_copy)
        (stale_copy / "data-00001-of-00002.arrow").write_bytes(b"an earlier push's extra shard")
        assert cli.main(["push", str(stale_copy), "--repo-id", "me/web2"]) == 0
        assert cli.main(["push", str(mixture_root / "mix" / "web"), "--repo-id", "me/web2"]) == 0
        assert "web/data-00001-of-00002.arrow" not in hub.files("me/web2", "dataset")
        assert "web/data-00000-of-00001.arrow" in hub.files("me/web2", "dataset")
        # a tokenized (not yet packed) directory pushes too, and its card says so
        assert cli.main(["push", str(mixture_root / "tok" / "books"), "--repo-id", "me/tok"]) == 0
        card = DatasetCard(hub.files("me/tok", "dataset")["README.md"].decode())
        assert "tokenized" in card.data.tags and "| `books` | tokenized | - | - | 12 |" in card.text
        # pushing one domain of a mixture repo alone would drop the others from the card's configs
        # (load_dataset(REPO, "books") would fail while its files stay): refused, nothing committed
        assert cli.main(["push", str(mixture_root / "mix"), "--repo-id", "me/mix"]) == 0
        commits = len(hub.commits)
        assert cli.main(["push", str(mixture_root / "mix" / "web"), "--repo-id", "me/mix"]) == 2
        assert "already holds the config(s) books" in capsys.readouterr().err
        assert len(hub.commits) == commits
        card = DatasetCard(hub.files("me/mix", "dataset")["README.md"].decode())
        assert sorted(c["config_name"] for c in card.data.configs) == ["books", "web"]


@pytest.mark.parametrize("case", ["no-repo-id", "bad-repo-id", "nested-repo-id", "not-a-dataset", "no-token",
                                  "401", "403-at-commit", "500-at-create"])
def test_push_bad_input_and_hub_refusals_exit_2_and_commit_nothing(case, mixture_root, tmp_path, monkeypatch, capsys):
    fail = {"403-at-commit": {"commit": 403}, "500-at-create": {"create": 500}}.get(case)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    directory, repo_id = str(mixture_root / "mix"), "org/name"
    args = {"no-repo-id": [], "bad-repo-id": ["--repo-id", "just-a-name"],
            "nested-repo-id": ["--repo-id", "a/b/c"]}.get(case, ["--repo-id", repo_id])
    if case == "not-a-dataset":
        directory = str(mixture_root / "tokenizer")
    with FakeHub(fail=fail) as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        if case != "no-token":
            monkeypatch.setenv("HF_TOKEN", "hf_wrong" if case == "401" else hub.token)
        code = cli.main(["push", directory, *args])
        assert hub.commits == []
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err and "commit_url" not in out
    expected = {"no-repo-id": "--repo-id is required", "bad-repo-id": "'just-a-name' is not a Hub repository id",
                "nested-repo-id": "'a/b/c' is not a Hub repository id",
                "not-a-dataset": "is not a prolong-data dataset", "no-token": "no Hugging Face token",
                "401": "rejected the token (401)", "403-at-commit": "no write access to org/name (403)",
                "500-at-create": "answered 500"}[case]
    last_line = err.strip().splitlines()[-1]
    assert expected in last_line and last_line.startswith("prolong-data push: error:"), err
    if case == "403-at-commit":
        assert hub.lfs_objects  # the files went up, but no commit names them: the repo is unchanged


def test_a_pushed_mixture_trains_and_inspects_from_its_hub_id(mixture_root, tmp_path, monkeypatch, capsys, caplog):
    from prolong.data.hub import HubDatasetError, resolve_dataset_dir
    from prolong.training.mixture import MixtureDataset

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    local = {str(mixture_root / "mix" / "books"): 0.5, str(mixture_root / "mix" / "web"): 0.5}
    with FakeHub() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)  # what HF_ENDPOINT sets at import
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setenv("HF_TOKEN", hub.token)
        assert cli.main(["push", str(mixture_root / "mix"), "--repo-id", "my-org/mix"]) == 0
        remote = {"hf://datasets/my-org/mix/books": 0.5, "hf://datasets/my-org/mix/web": 0.5}
        from_hub, from_disk = MixtureDataset(remote, 64, num_sequences=12), MixtureDataset(local, 64, num_sequences=12)
        def rows(mixture):
            return [{k: v.tolist() if hasattr(v, "tolist") else v for k, v in mixture[i].items()} for i in range(12)]

        assert rows(from_hub) == rows(from_disk)  # the same items, document spans included
        # the mixture's length check reads the downloaded domain's metadata (mode, packed length)
        import logging

        from prolong.config import DataConfig
        from prolong.training.mixture import check_packed_lengths

        with caplog.at_level(logging.INFO, logger="prolong.training.mixture"):
            data = DataConfig(dataset_mixture=remote, max_length=128, allow_packed_shorter=list(remote))
            assert check_packed_lengths(from_hub, data) == 64
        assert "hf://datasets/my-org/mix/web: packed at 64 tokens (short mode)" in caplog.text
        from prolong.model_card import dataset_tokens  # the model card's mixture table, from the cache

        assert dataset_tokens("hf://datasets/my-org/mix/web") == json.loads(
            (mixture_root / "mix" / "web" / "prolong_data.json").read_text())["num_tokens"] > 0
        capsys.readouterr()
        assert cli.main(["inspect", "hf://datasets/my-org/mix/web", "--json"]) == 0
        summary = json.loads(capsys.readouterr().out)[0]
        assert summary["num_rows"] == len(datasets.load_from_disk(str(mixture_root / "mix" / "web")))
        with pytest.raises(HubDatasetError,
                           match=r"holds the configs \['books', 'web'\].*hf://datasets/my-org/mix/CONFIG"):
            resolve_dataset_dir("hf://datasets/my-org/mix")
        with pytest.raises(HubDatasetError, match="cannot download the Hub dataset my-org/nothing"):
            resolve_dataset_dir("hf://datasets/my-org/nothing/web")
    assert resolve_dataset_dir("demo_data/books") == "demo_data/books"  # a bare path never goes to the network
