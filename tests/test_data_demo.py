"""The offline demo corpus: three packed domains from text present on any Python machine."""

import datasets
import pytest
from conftest import bpe_tokenizer

from prolong.data import read_metadata
from prolong.data.demo_corpus import JANEAUSTENR_DATA, build_demo_corpus, janeausten_novels, man_page_text


def byte_level_tokenizer():
    return bpe_tokenizer(["def class import return the of and to a in that is"] * 10, 400, ["<|endoftext|>"],
                         byte_alphabet=True, eos_token="<|endoftext|>")


def test_build_demo_corpus(tmp_path):
    length = 256
    # tmp_path holds no janeaustenr data, so books use the standard-library fallback on every machine.
    outputs = build_demo_corpus(byte_level_tokenizer(), tmp_path / "demo", length=length,
                                max_bytes_per_domain=120_000, janeaustenr_data=tmp_path)
    assert sorted(outputs) == ["books", "code_repos", "short"]
    for domain, directory in outputs.items():
        metadata = read_metadata(directory)
        rows = datasets.load_from_disk(str(directory))
        assert metadata["mode"] == ("short" if domain == "short" else "long") and metadata["length"] == length
        assert len(rows) == metadata["num_sequences"] > 20 and metadata["domains"] == {domain: len(rows) * length}
        assert set(map(len, rows["input_ids"])) == {length} and set(rows["domain"]) == {domain}
    code = byte_level_tokenizer().decode(datasets.load_from_disk(str(outputs["code_repos"]))[0]["input_ids"])
    assert code.split("\n", 1)[0].endswith(".py")  # a repository document starts with its first file's path


@pytest.mark.skipif(not (JANEAUSTENR_DATA / "Rdata.rdb").exists(), reason="r-cran-janeaustenr not installed")
def test_janeausten_novels():
    novels = janeausten_novels()
    assert len(novels) == 6 and novels[0].startswith("EMMA") and all(len(n) > 400_000 for n in novels)


def test_man_page_text():
    roff = '.\\" comment\n.TH LS 1\n.SH NAME\nls \\- list directory contents\n.SH DESCRIPTION\n.B ls\nlists \\fBfiles\\fR.\n'
    assert man_page_text(roff) == "NAME\nls - list directory contents\n\nDESCRIPTION\nls\nlists files."
