"""Micro-ProLong in small: the committed base model, trained a few steps beyond its window with the
demo's CPT recipe (RoPE theta raised, document-masked rows at 4x the window), finds the pass key at
4x its window far more often than the base, measured by the evaluation package."""

from __future__ import annotations

import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "recipes", "tiny", "base-model")


def _passkey_rows(tokenizer, out: str, count: int, seed: str) -> str:
    """Passkey documents of 512-1024 tokens (up to 4x the window), loss on the answer, bin-packed
    whole into 1024-token rows: the demo's `recall-long-1024` domain, smaller."""
    from prolong.data.pack import pack_dataset
    from prolong.demo.micro_data import passkey_dataset, recall_documents

    documents = recall_documents(tokenizer, count, 512, 1024, seed)
    pack_dataset(passkey_dataset(tokenizer, documents, True, "recall-long"), out, mode="sft", length=1024)
    return out


def test_committed_base_matches_its_checksums():
    from prolong.demo.outputs import verify_checksums

    verify_checksums(BASE)


@pytest.mark.slow
def test_training_beyond_the_window_beats_the_base_at_4x(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from prolong.demo.micro_data import MICRO_WINDOW
    from prolong.demo.micro_report import recall_scores
    from prolong.run_cpt import main

    tokenizer = AutoTokenizer.from_pretrained(BASE)
    train = _passkey_rows(tokenizer, str(tmp_path / "train"), 160, "test-train")
    out = main(["recipes/tiny/micro-cpt.yaml", "--model_name_or_path", BASE, "--dataset_mixture", json.dumps({train: 1.0}),
                "--max_steps", "30", "--output_dir", str(tmp_path / "cpt"), "--report_to", "none",
                "--save_strategy", "no", "--use_cpu", "true"])
    assert AutoConfig.from_pretrained(out).rope_parameters["rope_theta"] == 160000  # the recipe raised it
    base = recall_scores(BASE, str(tmp_path / "eval-base"), MICRO_WINDOW, 4, samples=20)
    trained = recall_scores(out, str(tmp_path / "eval-cpt"), MICRO_WINDOW, 4, samples=20)
    long = 4 * MICRO_WINDOW
    assert base[MICRO_WINDOW] >= 80, base          # the base retrieves inside its window ...
    assert base[long] <= 30, base                  # ... and not at 4x
    print("base", base, "trained 30 steps", trained)
    assert trained[long] >= base[long] + 30, (base, trained)
