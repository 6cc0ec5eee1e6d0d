"""Micro-ProLong in small: the committed base model, trained a few steps beyond its window with the
demo's CPT recipe, beats the base at 4x its window on held-out lookup documents."""

from __future__ import annotations

import json
import os

import pytest
from datasets import Dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "recipes", "tiny", "base-model")

pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(BASE, "SHA256SUMS")),
                                reason="the micro-ProLong base model is not committed yet (make demo-base)")


def _packed_lookups(tokenizer, out: str, count: int, seed: str, answers_only: bool = False) -> str:
    """Lookup documents of 900-1024 tokens (4x the window), one per row; with `answers_only`, only
    the answer (" 1234567." and EOS: the last 10 tokens) is scored."""
    from prolong.demo.corpus import recall_documents
    from prolong.data.pack import pack_dataset
    from prolong.data.tokenize import tokenize_dataset

    texts = recall_documents(tokenizer, count, 900, 1024, seed)
    tokenized, _ = tokenize_dataset(Dataset.from_dict({"text": texts}), tokenizer, domain="recall")
    if answers_only:
        tokenized = tokenized.map(lambda row: {"mask": [0] * (len(row["input_ids"]) - 10) + [1] * 10})
    pack_dataset(tokenized, out, mode="sft", length=1024)
    return out


def test_training_beyond_the_window_beats_the_base_at_4x(tmp_path):
    from transformers import AutoTokenizer

    from prolong.demo.cli import MICRO_WINDOW, packed_loss, verify_checksums
    from prolong.run_cpt import main

    verify_checksums(BASE)
    tokenizer = AutoTokenizer.from_pretrained(BASE)
    train = _packed_lookups(tokenizer, str(tmp_path / "train"), 24, "test-train")
    heldout = _packed_lookups(tokenizer, str(tmp_path / "heldout"), 8, "test-heldout", answers_only=True)
    out = main(["recipes/tiny/micro-cpt.yaml", "--model_name_or_path", BASE, "--dataset_mixture", json.dumps({train: 1.0}),
                "--max_steps", "6", "--output_dir", str(tmp_path / "cpt"), "--report_to", "none",
                "--save_strategy", "no", "--use_cpu", "true"])
    base_loss, trained_loss = packed_loss(BASE, heldout), packed_loss(out, heldout)
    assert 4 * MICRO_WINDOW == 1024
    assert trained_loss < base_loss - 0.3, (base_loss, trained_loss)
