"""Shared fixtures: a tiny real Llama with a tokenizer trained on the fly, and packed datasets.

Everything is built in a temporary directory from scratch (no hub), so the tests run offline.
"""

from __future__ import annotations

import os
import random

# The tests never reach the real Hub: point huggingface_hub at a closed loopback port, so a path
# that merely looks like a Hub id fails at once and no test sends traffic off this machine.
# Tests of the Hub client set HF_ENDPOINT to their own local server (tests/hub_server.py).
os.environ.setdefault("HF_ENDPOINT", "http://127.0.0.1:9")

import numpy as np
import pytest
import torch
from datasets import Dataset

VOCAB_SIZE = 320  # >= the tiny tokenizer's vocabulary; random documents use ids below 300

WORDS = (
    "the of and to in is that for it as with was on be by this are from at or an have not which but had they "
    "his her she he we you their one all were been has there can more when will would who so no if out up"
).split()


def tiny_llama_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def bpe_tokenizer(corpus: list[str], vocab_size: int, special_tokens: list[str], *, unk_token: str | None = None,
                  byte_alphabet: bool = False, **token_names):
    """A real byte-level BPE tokenizer trained on `corpus` (the one factory of the tests' tokenizers);
    `token_names`: eos_token=..., bos_token=..., pad_token=... from `special_tokens`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=unk_token))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = {"initial_alphabet": pre_tokenizers.ByteLevel.alphabet()} if byte_alphabet else {}
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, **alphabet))
    if unk_token is not None:
        token_names["unk_token"] = unk_token
    return PreTrainedTokenizerFast(tokenizer_object=tok, **token_names)


def train_tiny_tokenizer(vocab_size: int = 300):
    """A real byte-level BPE tokenizer trained on the fly, with BOS/EOS and a ChatML template."""
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(200)]
    fast = bpe_tokenizer(corpus, vocab_size, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                         eos_token="<|im_end|>", bos_token="<|im_start|>", pad_token="<|endoftext|>")
    fast.chat_template = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    return fast


def tiny_llama(vocab_size: int, *, silent: bool = False, **overrides):
    """A tiny LlamaForCausalLM of `tiny_llama_config`, random weights seeded 0 (the one model factory of
    the tests). `silent`: all logits equal, so greedy decoding picks id 0 at once."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size, **overrides))
    if silent:
        torch.nn.init.zeros_(model.lm_head.weight)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A saved tiny LlamaForCausalLM (random weights) + tokenizer, loadable by path."""
    path = str(tmp_path_factory.mktemp("tiny-llama"))
    tokenizer = train_tiny_tokenizer()
    model = tiny_llama(VOCAB_SIZE)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_packed_dataset(path: str, documents: list[list[int]], length: int, domain: str) -> str:
    """Pack documents with the real `prolong-data pack --mode short` code (concatenated, carried over),
    so the fixtures cannot drift from the packed format."""
    from prolong.data.pack import pack_dataset, packed_features
    from prolong.data.storage import FORMAT_VERSION, write_metadata

    if not documents:  # pack_dataset refuses to write no rows; an empty domain for the mixture's refusal
        Dataset.from_dict({name: [] for name in packed_features(False)}, features=packed_features(False)).save_to_disk(path)
        write_metadata(path, {"format": "prolong-packed", "version": FORMAT_VERSION, "mode": "short",
                              "length": length, "num_sequences": 0, "num_tokens": 0})
        return path
    tokenized = Dataset.from_dict({"input_ids": [list(doc) for doc in documents], "domain": [domain] * len(documents)})
    pack_dataset(tokenized, path, mode="short", length=length)
    return path


def random_documents(n: int, vocab_size: int, min_len: int, max_len: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab_size, size=int(rng.integers(min_len, max_len + 1))).tolist() for _ in range(n)]


@pytest.fixture(scope="session")
def packed_mixture(tmp_path_factory, tiny_model_dir) -> dict[str, float]:
    """Two packed domains (long-ish and short documents) at length 128."""
    root = tmp_path_factory.mktemp("packed")
    vocab = 300
    long_dir = write_packed_dataset(str(root / "long"), random_documents(40, vocab, 60, 200, 1), 128, "long")
    short_dir = write_packed_dataset(str(root / "short"), random_documents(200, vocab, 5, 40, 2), 128, "short")
    return {long_dir: 0.6, short_dir: 0.4}
