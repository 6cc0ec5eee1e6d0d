"""`prolong-data build RECIPE.yaml`: a data recipe of local files in each public source's format (a folder of
code repositories, the Stack's file rows, SlimPajama's jsonl with `meta`, FineWeb's parquet, Tulu-v2's
`messages`) built with the real tokenizer of recipes/tiny/base-model. Equivalences: a domain equals the
same data through `prolong-data tokenize` + `pack`; the Stack's rows concatenated by repository equal the
repository folders; a killed build resumed equals an uninterrupted one. The manifest trains as written."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import WORDS
from prolong.data import cli

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = str(REPO / "recipes" / "tiny" / "base-model")
FIXTURES = REPO / "tests" / "fixtures" / "data_build"
LENGTH = 256


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def write_sources(root: Path, web_documents: int = 300) -> None:
    """Local files with the columns of the Hub datasets the ProLong recipe names."""
    rng = random.Random(0)
    files = []  # (repository, path, content): the Stack v1's rows
    for repo, sizes in (("alpha", [300, 40, 200]), ("beta", [30, 20]), ("gamma", [400, 350, 10]), ("delta", [500])):
        for number, words in enumerate(sizes):
            path = f"pkg/mod{number}.py" if number else "README.md"
            content = f"def f{number}():\n    return '{_text(rng, words)}'\n"
            files.append((repo, path, content))
            target = root / "repos" / repo / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
    shuffled = rng.sample(files, len(files))  # the Stack's rows are in no repository order
    pq.write_table(pa.table({"max_stars_repo_name": [f[0] for f in shuffled],
                             "max_stars_repo_path": [f[1] for f in shuffled],
                             "content": [f[2] for f in shuffled]}), root / "the-stack.parquet")
    with open(root / "slimpajama.jsonl", "w") as f:  # SlimPajama: text + meta.redpajama_set_name
        for number in range(12):
            kind = "RedPajamaBook" if number % 3 else "RedPajamaArXiv"
            text = _text(rng, 700 if kind == "RedPajamaBook" else 50) + (" ARXIVONLY" if kind != "RedPajamaBook" else "")
            f.write(json.dumps({"text": text, "meta": {"redpajama_set_name": kind}}) + "\n")
    with open(root / "tulu.jsonl", "w") as f:
        for number in range(20):
            f.write(json.dumps({"dataset": "oasst", "id": f"t{number}", "messages": [
                {"role": "user", "content": _text(rng, 20)}, {"role": "assistant", "content": _text(rng, 30)}]}) + "\n")
    pq.write_table(pa.table({"text": [_text(rng, rng.randint(5, 120)) for _ in range(web_documents)],
                             "id": [f"<urn:{n}>" for n in range(web_documents)],
                             "dump": ["CC-MAIN-2023-50"] * web_documents}), root / "fineweb.parquet")


RECIPE = """\
length: {length}
domains:
  code-{length}:
    share: 0.3
    repos: repos
    mode: long
  book-{length}:
    share: 0.3
    files: [slimpajama.jsonl]
    where: {{meta.redpajama_set_name: RedPajamaBook}}
    mode: long
    min_length: {length}
  fineweb:
    share: 0.3
    files: [fineweb.parquet]
    mode: short
  tuluv2:
    share: 0.1
    files: [tulu.jsonl]
    text_field: messages
    mode: short
"""


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("build-sources")
    write_sources(root)
    (root / "recipe.yaml").write_text(RECIPE.format(length=LENGTH))
    return root


@pytest.fixture(scope="module")
def built(sources) -> Path:
    out = sources / "built"
    assert cli.main(["build", str(sources / "recipe.yaml"), "--tokenizer", TOKENIZER, "--out", str(out)]) == 0
    return out


def rows(folder: Path) -> dict:
    return datasets.load_from_disk(str(folder)).to_dict()


def test_each_domain_equals_tokenize_then_pack(sources, built, tmp_path):
    """build = the separate commands a user would type, domain by domain (the equivalence the benchmark times)."""
    steps = {"code-256": (["--repos", str(sources / "repos")], ["--mode", "long"]),
             "fineweb": ([str(sources / "fineweb.parquet")], ["--mode", "short"])}
    for name, (inputs, packing) in steps.items():
        label = name.removesuffix(f"-{LENGTH}")
        assert cli.main(["tokenize", *inputs, "--tokenizer", TOKENIZER, "--domain", label,
                         "--out", str(tmp_path / "tok" / name)]) == 0
        assert cli.main(["pack", str(tmp_path / "tok" / name), *packing, "--length", str(LENGTH),
                         "--out", str(tmp_path / "packed" / name)]) == 0
        assert rows(built / name) == rows(tmp_path / "packed" / name), name
    mixture = json.loads((built / "dataset_mixture.json").read_text())
    assert mixture == {str(built / "code-256"): 0.3, str(built / "book-256"): 0.3, str(built / "fineweb"): 0.3,
                       str(built / "tuluv2"): 0.1}
    assert not (built / "tokenized").exists()  # each source's tokens are removed once its domains are packed


def test_where_keeps_only_the_named_rows_and_chat_trains_every_token(built):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    books = datasets.load_from_disk(str(built / "book-256"))
    assert books.unique("domain") == ["book"] and len(books) > 0
    assert not any("ARXIVONLY" in tokenizer.decode(row) for row in books["input_ids"])
    tulu = datasets.load_from_disk(str(built / "tuluv2"))
    assert "mask" not in tulu.column_names  # continued pre-training: a conversation's every token is a target
    assert "<|endoftext|>" in tokenizer.decode(tulu[0]["input_ids"])


def test_stack_rows_concatenated_by_repository_equal_the_repository_folders(sources, tmp_path):
    recipe = tmp_path / "code.yaml"
    recipe.write_text(f"""\
length: {LENGTH}
domains:
  from-folders:
    share: 0.5
    repos: {sources / 'repos'}
    mode: long
    min_length: 2
  from-rows:
    share: 0.5
    files: [{sources / 'the-stack.parquet'}]
    text_field: content
    concat_by: max_stars_repo_name
    path_field: max_stars_repo_path
    mode: long
    min_length: 2
""")
    out = tmp_path / "out"
    assert cli.main(["build", str(recipe), "--tokenizer", TOKENIZER, "--out", str(out), "--keep_tokenized"]) == 0
    tokenized = sorted((out / "tokenized").iterdir())
    folders, stack = (datasets.load_from_disk(str(p)) for p in sorted(tokenized, key=lambda p: "rows" in p.name))
    assert len(folders) == 4  # one document per repository, in repository order
    assert folders["input_ids"] == stack["input_ids"]
    assert rows(out / "from-folders")["input_ids"] == rows(out / "from-rows")["input_ids"]


def test_the_manifest_trains_as_the_dataset_mixture(built):
    from prolong.config import DataConfig, parse_recipe
    from prolong.training.mixture import MixtureDataset

    (data,) = parse_recipe((DataConfig,), ["--dataset_mixture", (built / "dataset_mixture.json").read_text(),
                                           "--max_length", str(LENGTH)])
    mixture = MixtureDataset(data.dataset_mixture, LENGTH, num_sequences=40)
    domains = {mixture[i]["domain"] for i in range(40)}
    assert domains == {"code", "book", "fineweb", "tuluv2"}
    assert all(len(mixture[i]["input_ids"]) == LENGTH for i in range(40))


def test_rerun_keeps_complete_domains_and_refuses_a_changed_one(sources, built, tmp_path, capsys):
    before = {p: p.stat().st_mtime_ns for p in built.rglob("*.arrow")}
    assert cli.main(["build", str(sources / "recipe.yaml"), "--tokenizer", TOKENIZER, "--out", str(built)]) == 0
    assert {p: p.stat().st_mtime_ns for p in built.rglob("*.arrow")} == before  # nothing rebuilt
    reshared = sources / "reshared.yaml"  # shares do not change the data: only the manifest is rewritten
    reshared.write_text((sources / "recipe.yaml").read_text().replace("share: 0.3\n    files: [fineweb", "share: 0.2\n"
                                                                      "    files: [fineweb").replace("share: 0.1", "share: 0.2"))
    assert cli.main(["build", str(reshared), "--tokenizer", TOKENIZER, "--out", str(built)]) == 0
    assert json.loads((built / "dataset_mixture.json").read_text())[str(built / "tuluv2")] == 0.2
    assert cli.main(["build", str(sources / "recipe.yaml"), "--tokenizer", TOKENIZER, "--out", str(built)]) == 0
    changed = sources / "changed.yaml"
    changed.write_text((sources / "recipe.yaml").read_text().replace("    mode: long\n  book", "    mode: long\n"
                                                                     "    min_length: 300\n  book"))
    capsys.readouterr()
    assert cli.main(["build", str(changed), "--tokenizer", TOKENIZER, "--out", str(built)]) == 2
    error = capsys.readouterr().err
    assert "domain 'code-256' was built from another recipe" in error and f"delete {built / 'code-256'}" in error
    assert {p: p.stat().st_mtime_ns for p in built.rglob("*.arrow")} == before


@pytest.mark.slow  # a fresh process: ~5 s of imports before the build starts
def test_a_killed_build_resumes_to_the_uninterrupted_result(sources, built, tmp_path):
    """SIGKILL as soon as the first domain is complete (the others are being read, tokenized or packed)."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "prolong.data", "build", str(sources / "recipe.yaml"), "--tokenizer", TOKENIZER,
               "--out", str(out)]
    run = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "code-256" / "prolong_data.json").exists() and run.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        run.send_signal(signal.SIGKILL)
    finally:
        run.wait()
    assert run.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    complete = {p.name for p in out.iterdir() if (p / "prolong_data.json").is_file()}
    assert "code-256" in complete and "tuluv2" not in complete
    visible = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert visible - complete <= {"build.json", "tokenized"}  # no half domain under its own name
    for name in complete:
        assert rows(out / name) == rows(built / name)

    assert cli.main(["build", str(sources / "recipe.yaml"), "--tokenizer", TOKENIZER, "--out", str(out)]) == 0
    assert not [p.name for p in out.rglob("*") if ".tmp-" in p.name or ".cache-" in p.name]  # the killed run's
    for name in ("code-256", "book-256", "fineweb", "tuluv2"):
        assert rows(out / name) == rows(built / name), name
    assert (out / "dataset_mixture.json").read_text() == (built / "dataset_mixture.json").read_text().replace(
        str(built), str(out))


def _pack_has_document_length() -> bool:
    import inspect

    from prolong.data.pack import pack_dataset

    return "document_length" in inspect.signature(pack_dataset).parameters


@pytest.mark.skipif(not _pack_has_document_length(),
                    reason="pack_dataset(document_length=...) comes with `pack --document_length` (issue 23, piece 1)")
def test_stage2_rows_of_shorter_documents_come_from_the_same_tokens(sources, tmp_path):
    """512K-style rows: code of >= L tokens one per row, and code cut into D-token pieces (D = L/2, as
    long mode cuts into L-token rows), two per row, both from one tokenization of the source."""
    recipe = tmp_path / "stage2.yaml"
    recipe.write_text(f"""\
length: {2 * LENGTH}
domains:
  code-{2 * LENGTH}:
    share: 0.5
    repos: {sources / 'repos'}
    mode: long
  code-{LENGTH}:
    share: 0.5
    repos: {sources / 'repos'}
    mode: long
    document_length: {LENGTH}
""")
    out = tmp_path / "out"
    assert cli.main(["build", str(recipe), "--tokenizer", TOKENIZER, "--out", str(out), "--keep_tokenized"]) == 0
    assert len(list((out / "tokenized").iterdir())) == 1  # one source, tokenized once
    documents = datasets.load_from_disk(str(next((out / "tokenized").iterdir())))["input_ids"]
    cut = [doc[i:i + LENGTH] for doc in documents for i in range(0, len(doc) - LENGTH + 1, LENGTH)]
    packed = datasets.load_from_disk(str(out / f"code-{LENGTH}"))
    assert all(len(row) == 2 * LENGTH for row in packed["input_ids"])
    assert all(spans == [[0, LENGTH], [LENGTH, 2 * LENGTH]] for spans in packed["indices"])
    assert [row[i:i + LENGTH] for row in packed["input_ids"] for i in (0, LENGTH)] == cut[:2 * len(packed)]


RECIPE_ERRORS = [
    ("unknown-key.yaml", "domain 'web': unknown key 'min_lenght'; did you mean 'min_length'?"),
    ("shares.yaml", "the shares sum to 0.9, not 1"),
    ("missing-source.yaml", "domain 'web': files: not found:"),
    ("bad-mode.yaml", "domain 'web': mode must be long or short, got 'sft'"),
    ("document-length-short.yaml", "domain 'web': document_length applies to mode long only"),
]


@pytest.mark.parametrize("name, message", RECIPE_ERRORS, ids=[name for name, _ in RECIPE_ERRORS])
def test_a_bad_recipe_is_refused_before_anything_is_written(name, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["build", str(FIXTURES / name), "--tokenizer", TOKENIZER, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_the_prolong_recipes_give_the_stage_recipes_mixtures():
    """build --out data/prolong-64K gives stage1.yaml's dataset_mixture exactly (512K: stage2.yaml's)."""
    import yaml

    from prolong.data.build import mixture_paths
    from prolong.data.recipe import parse_data_recipe

    for data, stage in (("data-64k.yaml", "stage1.yaml"), ("data-512k.yaml", "stage2.yaml")):
        recipe = parse_data_recipe(REPO / "recipes" / "prolong-8b" / data)
        stage_recipe = yaml.safe_load((REPO / "recipes" / "prolong-8b" / stage).read_text())
        out = os.path.dirname(next(iter(stage_recipe["dataset_mixture"])))
        assert mixture_paths(recipe, out) == stage_recipe["dataset_mixture"]
        assert {domain.length for domain in recipe.domains} == {stage_recipe["max_length"]}


def test_a_pushed_tokenized_source_builds_from_its_hf_address(sources, built, tmp_path, monkeypatch):
    """`hub: hf://datasets/ORG/NAME/CONFIG`: a `prolong-data tokenize` output pushed to the (local fake) Hub
    is downloaded and packed as it is, giving the domain built from the raw file."""
    from huggingface_hub import constants

    from hub_server import FakeHub

    assert cli.main(["tokenize", str(sources / "fineweb.parquet"), "--tokenizer", TOKENIZER,
                     "--out", str(tmp_path / "tok" / "fineweb")]) == 0
    (tmp_path / "recipe.yaml").write_text(f"length: {LENGTH}\ndomains:\n  fineweb:\n    share: 1.0\n"
                                          "    hub: hf://datasets/my-org/tokenized/fineweb\n    mode: short\n")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with FakeHub() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setenv("HF_TOKEN", hub.token)
        assert cli.main(["push", str(tmp_path / "tok" / "fineweb"), "--repo-id", "my-org/tokenized"]) == 0
        assert cli.main(["build", str(tmp_path / "recipe.yaml"), "--tokenizer", TOKENIZER,
                         "--out", str(tmp_path / "out")]) == 0
    assert rows(tmp_path / "out" / "fineweb") == rows(built / "fineweb")
