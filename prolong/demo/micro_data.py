"""Micro-ProLong's data: a 2K BPE tokenizer trained here, passkey documents laid out like the
evaluation's recall prompt, and the packed domains of the base and of the CPT.

Micro-ProLong is the embedded default: a 1M-parameter Llama (256-token window, RoPE theta 1e4) that
looks keys up inside its window and fails at 4x; CPT at 1K (theta raised, long + short mixture,
document masking) and SFT, then a before/after table (prolong/demo/micro_report.py).
"""

from __future__ import annotations

from pathlib import Path

from prolong.data.demo_corpus import (JANEAUSTENR_DATA, MAN_ROOT, capped, janeausten_novels, man_pages,
                                      stdlib_docstring_books, stdlib_docstrings)

MICRO_WINDOW = 256
MICRO_FACTOR = 4
MICRO_VOCAB = 2048
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
RECALL_TASK = "passkey_word"  # evaluation/tasks/recall.py: a one-noun pass key in RULER's noise sentences

# The base learns retrieval with a length curriculum: (row length, steps) per stage. Started at its full
# 256-token window a 1M-parameter model found no needle after 200 steps; grown from short rows it
# retrieved 100% at 256 by the same step (measured on synthetic tokens, /docs/micro-prolong.md).
BASE_STAGES = ((96, 60), (160, 60), (MICRO_WINDOW, 240))


def short_texts(split: str, max_bytes: int) -> list[str]:
    """Man pages (standard-library docstrings without them): every 10th page is held out ("heldout"),
    the others are "train", so short-text loss is measured on documents never trained on."""
    pages = man_pages() if any(MAN_ROOT.glob("man[1-8]/*")) else stdlib_docstrings()
    keep = (lambda i: i % 10 == 0) if split == "heldout" else (lambda i: i % 10 != 0)
    return capped((text for i, text in enumerate(pages) if keep(i)), max_bytes)


def recall_documents(tokenizer, count: int, min_tokens: int, max_tokens: int, seed: str) -> list[tuple[str, str]]:
    """`count` (prompt, answer) pairs laid out exactly like the evaluation's `RECALL_TASK` prompt (no
    chat template), each sized to a random token count in [min_tokens, max_tokens] with the needle at a
    random depth. The item streams are seeded by `seed` and the document index, never by the
    evaluation's (task, length, index, seed), so training and test samples differ."""
    import random

    from evaluation.generation import PromptBuilder
    from evaluation.synthetic import BUILDERS, fit_items_to_length, stable_seed
    from evaluation.tasks import get_task

    task = get_task(RECALL_TASK)
    build = BUILDERS[task.extra["builder"]]
    builder = PromptBuilder(tokenizer)
    rng = random.Random(stable_seed("micro-prolong", seed))
    answer_tokens = 4  # " saddle." plus EOS
    documents = []
    for index in range(count):
        target = rng.randint(min_tokens, max_tokens) - answer_tokens
        depth = rng.random()
        sample_seed = stable_seed("micro-prolong", seed, index)
        _, fields = fit_items_to_length(lambda n: build(sample_seed, n, depth), builder.count(task, False), target)
        prompt, _ = builder.text(task, fields, use_chat_template=False)
        documents.append((prompt, f" {fields['answer'][0]}."))
    return documents


def train_micro_tokenizer(texts: list[str], vocab_size: int = MICRO_VOCAB):
    """A byte-level BPE trained on the demo texts (digits kept one per token, as SmolLM2 does, so a
    7-digit value is 7 tokens wherever it appears), with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    return tokenizer


def micro_tokenizer_texts(seed: int = 0) -> list[str]:
    """What the micro tokenizer is trained on: man pages (training split), passkey prompts (so the
    keys and noise sentences are single tokens), chat turns."""
    import random

    import chatterbot_corpus
    import yaml

    from evaluation.generation import PromptBuilder
    from evaluation.synthetic import BUILDERS
    from evaluation.tasks import get_task

    task = get_task(RECALL_TASK)
    rng = random.Random(seed)
    lookups = [PromptBuilder(None).text(task, BUILDERS[task.extra["builder"]](rng.getrandbits(60), rng.randint(2, 30),
                                                                               rng.random()), False)[0]
               for _ in range(2000)]
    chats = []
    for path in sorted((Path(chatterbot_corpus.__file__).parent / "data" / "english").glob("*.yml")):
        for conversation in (yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.BaseLoader) or {}).get("conversations") or []:
            chats.extend(turn for turn in conversation if isinstance(turn, str))
    return short_texts("train", 2_000_000) + lookups + chats


def passkey_dataset(tokenizer, documents: list[tuple[str, str]], answer_only: bool, domain: str):
    """Tokenized (prompt, answer) documents as `prolong-data tokenize` writes them (EOS appended);
    `answer_only` adds a loss mask on the answer and EOS, as SFT data has."""
    import datasets as hf_datasets

    from prolong.data.tokenize import tokenized_features

    ids, masks = [], []
    for prompt, answer in documents:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids.append(p + a)
        masks.append([0] * len(p) + [1] * len(a))
    columns = {"input_ids": ids, "domain": [domain] * len(ids), "length": [len(x) for x in ids]}
    if answer_only:
        columns["mask"] = masks
    return hf_datasets.Dataset.from_dict(columns, features=tokenized_features(chat=answer_only))


def build_micro_data(tokenizer, out_dir: str, *, window: int = MICRO_WINDOW, factor: int = MICRO_FACTOR,
                     short_mb: float = 2.0, books_mb: float = 1.0, overwrite: bool = False, seed: int = 0,
                     base: bool = True) -> dict:
    """Packed domains for the base (at `window` and its curriculum lengths) and the CPT (at
    `factor` x `window`); `base=False` skips the base's domains (the demo's CPT needs none):

    recall-base-N        passkey documents of up to N tokens, loss on the answer only (base curriculum)
    short-W / short-L    man pages (training split), short mode
    recall-short-L       passkey documents inside the window, bin-packed whole in L-token rows
    recall-long-L        passkey documents of L/2..L tokens (CPT's long data: needles beyond the window)
                         (both with the loss on the answer only: with it on the whole document, the
                         CPT learned the noise sentences and answered " yellow." at every length)
    books-L              Jane Austen's novels (or docstrings), long mode
    heldout-short-W      held-out man pages: the short-text loss
    """
    import datasets as hf_datasets

    from prolong.data.pack import pack_dataset
    from prolong.data.tokenize import tokenize_dataset

    long_len = window * factor
    shortest = len(tokenizer(recall_documents(tokenizer, 1, 0, 0, "probe")[0][0])["input_ids"]) + 4
    plan = []  # (dataset, name, mode, length)

    def texts(name, items):
        return tokenize_dataset(hf_datasets.Dataset.from_dict({"text": items}), tokenizer, domain=name)[0]

    if base:
        for length, _ in BASE_STAGES:
            docs = recall_documents(tokenizer, 3000, shortest, length, f"base-{length}-{seed}")
            plan.append((passkey_dataset(tokenizer, docs, True, f"recall-base-{length}"), f"recall-base-{length}",
                         "sft", length))
    short = texts("short", short_texts("train", int(short_mb * 1e6)))
    books = janeausten_novels() if (JANEAUSTENR_DATA / "Rdata.rdb").exists() else list(stdlib_docstring_books())
    plan += [
        (short, f"short-{window}", "short", window), (short, f"short-{long_len}", "short", long_len),
        (passkey_dataset(tokenizer, recall_documents(tokenizer, 800, shortest, window, f"short-{seed}"), True,
                         "recall-short"), f"recall-short-{long_len}", "sft", long_len),
        (passkey_dataset(tokenizer, recall_documents(tokenizer, 400, long_len // 2, long_len, f"long-{seed}"),
                         True, "recall-long"), f"recall-long-{long_len}", "sft", long_len),
        (texts("books", capped(iter(books), int(books_mb * 1e6))), f"books-{long_len}", "long", long_len),
        (texts("heldout", short_texts("heldout", 300_000)), f"heldout-short-{window}", "short", window),
    ]
    out = {}
    for dataset, name, mode, length in plan:
        pack_dataset(dataset, Path(out_dir) / name, mode=mode, length=length, overwrite=overwrite)
        out[name] = str(Path(out_dir) / name)
    return out
