"""Training throughput and memory: ProLong's step vs TRL padding-free vs plain padded Trainer, side by side.

    # GPU (H100/H200): Llama-3.2-1B shape, 8K..64K, checkpointing on for every method
    python benchmarks/bench_train.py --shape llama-3.2-1b --lengths 8192 16384 32768 65536 \
        --activation-checkpointing --json out.json
    # CPU (automatic without CUDA, or --cpu): tiny shape, tiny lengths, under a minute
    python benchmarks/bench_train.py --cpu

What is measured, for every sequence length, on the SAME rows of the SAME randomly initialised model:

* ``prolong``: the ``prolong/run_cpt.py`` path. ``PackedCollator`` -> ``CPTTrainer`` (our
  ``compute_loss``: forward with ``logits_to_keep=1``, then the loss ``loss_kernel: auto`` picks:
  Liger's or TRL's fused linear cross-entropy on CUDA, the chunked fp32 loss on CPU;
  ``--loss chunked`` forces the chunked one) with the chosen attention backend.
* ``trl-padding-free``: TRL's ``SFTTrainer`` with ``packing=True, packing_strategy="bfd"`` (padding-free
  rows; what ``prolong/run_sft.py`` runs). Each row's documents go through TRL's own ``pack_dataset``
  and data collator, then its ``training_step``.
* ``hf-padded``: plain ``transformers.Trainer``; the row's documents are one batch padded to the
  longest with an ``attention_mask`` (the baseline users start from). ``varlen`` needs one flat row, so
  this method uses ``sdpa`` when ``varlen`` is asked for (the ``attn`` column says what ran).

The step is built as the recipes build it. Each trainer runs ``Trainer.train()``'s own set-up and
is stopped by a callback at ``on_train_begin``, before its first step (``set_up_as_train``):
``train()``, not ``__init__``, applies Liger's layer kernels and turns on
activation checkpointing (and with it ``--offload`` / ``--checkpoint-every``); our
``CPTTrainer._inner_training_loop`` then tiles the MLPs (``--tiled-mlp``) and ``accelerate``
prepares the model and optimizer. A benchmark that called ``training_step`` on a trainer fresh
from ``__init__`` measured none of these. One step is then what the Trainer's loop does per
optimizer step: ``training_step`` (forward + backward) + gradient clipping at ``max_grad_norm``
(1.0 for all three) + AdamW step + scheduler step + ``zero_grad``. ``--warmup`` steps run first
and are not timed. Precision, as ``bf16: true`` trains: fp32 parameters and AdamW state (master
weights), bf16 autocast for the compute on CUDA (``bf16=True``); fp32 throughout on CPU.
``--layers N`` keeps N of the shape's decoder layers (a large layer shape on one GPU).

Options apply to every method alike and are set explicitly for each (TRL's ``SFTConfig`` defaults
``gradient_checkpointing=True``; here ``activation_checkpointing`` is always given, True or False):
``--activation-checkpointing`` (every ``--checkpoint-every``-th decoder layer), ``--offload`` (the
checkpointed layers' saved tensors to pinned host memory through ``save_on_cpu``, transformers'
``activation_checkpointing_kwargs={"offload": True}``; a no-op on CPU), ``--liger-kernels`` (``use_liger_kernel``:
Liger's layer kernels, CUDA). ``--tiled-mlp TOKENS`` (our ``tiled_mlp_tokens``) exists for
``prolong`` only.

Repeats: ``--repeats R`` runs the methods interleaved (A B C A B C ...), each run in a fresh process
(peak memory and OOM state are the run's own), and reports the median with the spread (min-max)
over the repeats: sequential per-method runs on a shared machine measured the machine's load.

Data (seeded, identical for every method): each row is ``length`` tokens. A share ``--long-share``
(default 0.6, ProLong's 60% long data) of the rows is ONE full-length document (a book or a code
repository cut to the length); the other rows concatenate short documents whose lengths are drawn
from a log-normal with mu=6.5, sigma=1.2 (median ~665 tokens, mean ~1.4K, 1% above ~11K: a
web/StackExchange-like long tail), clipped to [16, length], the last one cut to fill the row. The
timed steps hold the long rows spread evenly (largest remainder) so their share is exact; the warm-up
steps alternate long and short rows so every code path is warm.

FLOPs and MFU (model FLOPs utilisation; activation recomputation NOT counted, padding NOT counted):

    FLOPs(step) = 6 * N * T  +  6 * n_layers * d_attn * sum_i(n_i ** 2)

    N      = parameters that take part in a matrix multiply per token: every parameter except the
             input embedding table, with the output projection (lm_head) counted even when it is tied
             to the embedding
    T      = real (non-padding) tokens of the step
    d_attn = n_heads * head_dim (the query width; = hidden size for Llama)
    n_i    = length of document i of the step (attention never crosses a document)

``6 N T`` is the forward (2 N T) + backward (4 N T) of the matmuls. The attention term is
QK^T and AV (2 matmuls x 2 FLOPs x n^2 x d_attn per layer forward, times 3 for forward + backward
= 12 n^2 d_attn) halved for the causal mask: ``6 n_layers d_attn n^2``. This is the PaLM/torchtitan
formula (``6N + 12 l d n`` per token) with its attention term halved for causality and evaluated per
document. MFU = FLOPs / step time / peak; the peak is dense bf16 TFLOP/s per device from
``PEAK_TFLOPS`` (H100 SXM / H200: 989) or ``--peak-tflops``; on CPU there is no peak, MFU is n/a.

Memory: ``torch.cuda.max_memory_allocated`` (reset per length) on GPU. On CPU, the process peak RSS
(``ru_maxrss``) so far: lengths run in increasing order, so it is the peak of the longest length run.
A length that raises ``torch.OutOfMemoryError`` is recorded as OOM, memory is freed, and the next
length runs. Output: a markdown table on stdout and, with ``--json``, every figure plus the device,
library versions, date and command, rewritten after every run (``runs_done`` of ``runs_planned``),
so a run stopped by a time limit keeps the repeats it finished.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES_DIR = Path(__file__).resolve().parent / "shapes"
METHODS = ("prolong", "trl-padding-free", "hf-padded")

# Dense bf16 TFLOP/s per device (vendor datasheets, no sparsity). Matched against the CUDA device
# name in order, so the more specific names come first.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0))

LONG_SHARE = 0.6  # ProLong: 60% long data / 40% short data works best
SHORT_DOC_MU, SHORT_DOC_SIGMA, MIN_DOC = 6.5, 1.2, 16

CPU_DEFAULTS = {"shape": "tiny", "lengths": [512, 2048], "warmup": 1, "steps": 3, "repeats": 3}
GPU_DEFAULTS = {"shape": "llama-3.2-1b", "lengths": [8192, 16384, 32768, 65536], "warmup": 2, "steps": 5, "repeats": 3}


# --------------------------------------------------------------------------------------------------
# Data: the same rows for every method


def row_kinds(num_warmup: int, num_steps: int, long_share: float) -> list[bool]:
    """True = a full-length-document row. Warm-up alternates; timed rows hold the exact share."""
    warmup = [i % 2 == 0 for i in range(num_warmup)]
    timed = [int((i + 1) * long_share) > int(i * long_share) for i in range(num_steps)]
    return warmup + timed


def row_document_lengths(length: int, is_long: bool, rng: np.random.Generator) -> list[int]:
    """Document lengths of one row: one full-length document, or log-normal short ones filling it."""
    if is_long:
        return [length]
    lengths, total = [], 0
    while total < length:
        doc = int(np.clip(rng.lognormal(SHORT_DOC_MU, SHORT_DOC_SIGMA), MIN_DOC, length))
        doc = min(doc, length - total)  # the last document is cut to fill the row
        lengths.append(doc)
        total += doc
    return lengths


def make_rows(length: int, kinds: list[bool], vocab_size: int, seed: int) -> list[list[np.ndarray]]:
    """Each row is a list of documents (token-id arrays) summing to exactly `length` tokens."""
    rng = np.random.default_rng([seed, length])
    rows = []
    for is_long in kinds:
        doc_lengths = row_document_lengths(length, is_long, rng)
        rows.append([rng.integers(3, vocab_size, n, dtype=np.int64) for n in doc_lengths])
    return rows


# --------------------------------------------------------------------------------------------------
# FLOPs


def matmul_parameters(model) -> int:
    """N of the formula: all parameters but the input embedding, the lm_head counted even if tied."""
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    embedding = model.get_input_embeddings().weight
    lm_head = model.get_output_embeddings().weight
    tied = lm_head is embedding
    return total - embedding.numel() + (lm_head.numel() if tied else 0)


def training_flops(num_matmul_params: int, num_layers: int, attn_dim: int, doc_lengths: list[int]) -> float:
    """Model FLOPs of one training step (forward + backward, no recomputation) over these documents."""
    tokens = sum(doc_lengths)
    attention = 6.0 * num_layers * attn_dim * sum(float(n) ** 2 for n in doc_lengths)
    return 6.0 * num_matmul_params * tokens + attention


def peak_tflops_of(device_name: str) -> float | None:
    return next((tflops for name, tflops in PEAK_TFLOPS if name in device_name), None)


# --------------------------------------------------------------------------------------------------
# One method's trainer and batches (worker process)


def build_model(shape: str, max_length: int, attn: str, device: str, layers: int | None = None):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from prolong.model import apply_rope_settings

    spec = json.loads(Path(shape_path(shape)).read_text())
    spec.pop("_comment", None)
    if layers:  # the shape's layers, fewer of them (an 8B layer shape on one GPU)
        spec["num_hidden_layers"] = layers
    config = AutoConfig.for_model(**spec)
    apply_rope_settings(config, rope_theta=None, rope_scaling=None, max_length=max_length)
    config.use_cache = False  # training; every method alike
    torch.manual_seed(0)
    # fp32 master weights and AdamW state; on CUDA the Trainer's bf16=True autocasts the compute
    # (what `bf16: true` trains with: no optimizer steps bf16 weights)
    with torch.device(device):  # random init directly on the device
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)


def shape_path(shape: str) -> str:
    return shape if shape.endswith(".json") else str(SHAPES_DIR / f"{shape}.json")


def trainer_arguments(ns, cuda: bool) -> dict:
    """TrainingArguments fields shared by the three methods, each given explicitly (TRL's defaults differ)."""
    kwargs = dict(
        output_dir=tempfile.mkdtemp(prefix="bench_train-"),
        per_device_train_batch_size=1,
        max_steps=1,  # train() only runs its set-up (set_up_as_train); the benchmark drives the steps
        max_grad_norm=1.0,
        bf16=cuda,
        use_cpu=not cuda,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=ns.seed,
        use_liger_kernel=ns.liger_kernels and cuda,
        activation_checkpointing=ns.activation_checkpointing,  # False too: SFTConfig defaults to True
    )
    if ns.activation_checkpointing:
        kwargs["activation_checkpointing_kwargs"] = {
            "use_reentrant": False,
            # on CPU the activations already live in host memory (and pinned memory is refused:
            # docs/versions.md), so offload is a no-op there
            "offload": ns.offload and cuda,
            "every_n_layers": ns.checkpoint_every,  # 1 = every layer; 2 = every other layer, ...
        }
    return kwargs


def stub_tokenizer():
    """TRL's SFTTrainer wants a tokenizer for its pad token; the data is already token ids."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build_trainer(method: str, model, ns, cuda: bool, first_row: list[np.ndarray]):
    common = trainer_arguments(ns, cuda)
    if method == "prolong":
        from prolong.training.collator import PackedCollator
        from prolong.config import CPTConfig
        from prolong.training.trainer import CPTTrainer

        args = CPTConfig(**common, check_document_masking=False, tiled_mlp_tokens=ns.tiled_mlp, loss_kernel=ns.loss)
        lengths = np.cumsum([0] + [len(d) for d in first_row])
        example = {"input_ids": np.concatenate(first_row), "indices": np.stack([lengths[:-1], lengths[1:]], 1)}
        return CPTTrainer(model=model, args=args, data_collator=PackedCollator(), train_dataset=[example])
    if method == "trl-padding-free":
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**common, packing=True, packing_strategy="bfd", max_length=max(ns.lengths))
        dataset = Dataset.from_dict({"input_ids": [doc.tolist() for doc in first_row]})
        return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=stub_tokenizer())
    if method == "hf-padded":
        from transformers import Trainer, TrainingArguments

        example = {"input_ids": first_row[0][:64].tolist(), "labels": first_row[0][:64].tolist()}
        return Trainer(model=model, args=TrainingArguments(**common), train_dataset=[example])
    raise ValueError(f"unknown method {method}")


class _SetUpDone(Exception):
    pass


def set_up_as_train(trainer) -> None:
    """Run ``trainer.train()`` up to its first step: everything train() sets up (Liger's kernels,
    activation checkpointing and offload, CPTTrainer's tiled MLP, accelerate's prepare, the
    optimizer and scheduler) comes from the Trainer's own code, then a callback stops it."""
    from transformers import TrainerCallback

    class StopBeforeFirstStep(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            raise _SetUpDone

    trainer.add_callback(StopBeforeFirstStep)
    try:
        trainer.train()
    except _SetUpDone:
        pass
    finally:
        trainer.remove_callback(StopBeforeFirstStep)


def make_batch(method: str, trainer, docs: list[np.ndarray]) -> dict:
    """One row's documents in the method's own batch format, made by the method's own code."""
    import torch

    if method == "prolong":
        lengths = np.cumsum([0] + [len(d) for d in docs])
        example = {"input_ids": np.concatenate(docs), "indices": np.stack([lengths[:-1], lengths[1:]], 1)}
        return trainer.data_collator([example])
    if method == "trl-padding-free":
        from datasets import Dataset
        from trl.data_utils import pack_dataset

        # the row's documents sum to exactly the length, so best-fit-decreasing gives one row
        packed = pack_dataset(Dataset.from_dict({"input_ids": [d.tolist() for d in docs]}), sum(map(len, docs)))
        return trainer.data_collator([packed[0]])
    # hf-padded: right-padded batch, attention_mask, labels -100 on padding
    width = max(len(d) for d in docs)
    input_ids = torch.zeros(len(docs), width, dtype=torch.long)
    attention_mask = torch.zeros(len(docs), width, dtype=torch.long)
    for i, doc in enumerate(docs):
        input_ids[i, : len(doc)] = torch.from_numpy(doc)
        attention_mask[i, : len(doc)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# --------------------------------------------------------------------------------------------------
# Timing (worker process)


def train_step(trainer, batch: dict) -> None:
    """What Trainer.train's loop does for one optimizer step of one micro-batch."""
    model = trainer.model_wrapped  # as prepared by accelerate in set_up_as_train
    batches, num_items = trainer.get_batch_samples(iter([batch]), 1, trainer.args.device)
    trainer.training_step(model, batches[0], num_items)
    if trainer.args.max_grad_norm > 0:
        trainer._clip_grad_norm(model)
    if trainer.optimizer is not None:
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    model.zero_grad(set_to_none=True)


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_gib() -> tuple[float, str]:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30, "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS"


def free_memory(trainer) -> None:
    import gc

    import torch

    if trainer.optimizer is not None:
        trainer.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def time_steps(method: str, trainer, rows: list, warmup: int) -> float:
    """Run the warm-up rows, then return the seconds the remaining rows take."""
    for docs in rows[:warmup]:
        train_step(trainer, make_batch(method, trainer, docs))
    batches = [make_batch(method, trainer, docs) for docs in rows[warmup:]]  # built before the clock
    synchronize()
    start = time.perf_counter()
    for batch in batches:
        train_step(trainer, batch)
    synchronize()
    return time.perf_counter() - start


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA raises torch.OutOfMemoryError; the CPU allocator a RuntimeError "can't allocate memory"."""
    import torch

    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(error)


def measure_length(method: str, trainer, length: int, ns, flops_of) -> dict:
    """Warm up, then time `ns.steps` steps at one length; OOM is a result, not a crash."""
    kinds = row_kinds(ns.warmup, ns.steps, ns.long_share)
    rows = make_rows(length, kinds, trainer.model.config.vocab_size, ns.seed)
    free_memory(trainer)
    try:
        seconds = time_steps(method, trainer, rows, ns.warmup)
    except (RuntimeError, MemoryError) as error:  # torch.OutOfMemoryError is a RuntimeError
        if not is_out_of_memory(error):
            raise
        seconds = None  # leaving the except block drops the traceback and the tensors it holds
    if seconds is None:
        free_memory(trainer)
        return {"method": method, "length": length, "status": "OOM"}
    peak, memory_kind = peak_memory_gib()
    free_memory(trainer)
    timed_docs = [len(d) for docs in rows[ns.warmup :] for d in docs]
    tokens = sum(timed_docs)
    return {
        "method": method,
        "length": length,
        "status": "ok",
        "steps": ns.steps,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "step_s": seconds / ns.steps,
        "tflops_per_s": flops_of(timed_docs) / seconds / 1e12,
        "peak_memory_gib": peak,
        "memory_kind": memory_kind,
        "documents_per_row": len(timed_docs) / ns.steps,
    }


def prepare_method(method: str, ns):
    """The model and the method's trainer, set up as train() sets it up; returns (trainer, attn)."""
    import datasets
    import torch

    from prolong.training.attention import choose_attn_implementation  # also registers the "varlen" backend

    datasets.disable_progress_bars()  # TRL packs each row with datasets.map
    cuda = torch.cuda.is_available()
    attn = choose_attn_implementation(ns.attn)
    if method == "hf-padded" and attn == "varlen":
        attn = "sdpa"  # varlen needs one flat row; a padded batch has many
    model = build_model(ns.shape, max(ns.lengths), attn, "cuda" if cuda else "cpu", ns.layers)
    first_row = make_rows(min(ns.lengths), [False], model.config.vocab_size, ns.seed)[0]
    trainer = build_trainer(method, model, ns, cuda, first_row)
    set_up_as_train(trainer)
    if ns.optimizer == "none":
        trainer.optimizer = None  # AdamW allocates its state at the first step: none is held
    return trainer, attn


def run_worker(method: str, ns) -> dict:
    """Build the model and the method's trainer once; measure every length, shortest first."""
    import importlib.metadata as md

    import torch

    trainer, attn = prepare_method(method, ns)
    model = trainer.accelerator.unwrap_model(trainer.model)
    cuda = torch.cuda.is_available()
    config = model.config
    num_params = matmul_parameters(model)
    attn_dim = config.num_attention_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)

    def flops_of(doc_lengths):
        return training_flops(num_params, config.num_hidden_layers, attn_dim, doc_lengths)

    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    peak = ns.peak_tflops or (peak_tflops_of(device_name) if cuda else None)
    results = []
    for length in sorted(ns.lengths):
        result = measure_length(method, trainer, length, ns, flops_of)
        result["attn"] = attn
        if result["status"] == "ok" and peak:
            result["mfu"] = result["tflops_per_s"] / peak
        print(f"[{method}] {length}: {result['status']} {result.get('tokens_per_s', 0):.0f} tokens/s", file=sys.stderr)
        results.append(result)
    versions = {name: md.version(name) for name in ("torch", "transformers", "trl", "accelerate", "datasets")}
    meta = {
        "device": device_name,
        "peak_tflops": peak,
        "versions": versions,
        "matmul_parameters": num_params,
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(model.dtype).removeprefix("torch."),  # of the parameters (master weights)
        "compute_dtype": "bfloat16 (autocast)" if trainer.args.bf16 else "float32",
        "num_hidden_layers": config.num_hidden_layers,
        "loss_kernel": getattr(trainer, "loss_kernel", None),  # prolong's: which loss ran
        "checkpointing_on": bool(getattr(model, "is_activation_checkpointing", False)),
    }
    return {"meta": meta, "results": results}


# --------------------------------------------------------------------------------------------------
# The run: one worker process per method, then the table (parent process; imports no torch)


def worker_command(method: str, ns, out: str) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--worker-out", out,
           "--shape", ns.shape, "--lengths", *map(str, ns.lengths), "--attn", ns.attn,
           "--warmup", str(ns.warmup), "--steps", str(ns.steps), "--long-share", str(ns.long_share),
           "--loss", ns.loss, "--optimizer", ns.optimizer, "--seed", str(ns.seed)]
    if ns.layers:
        cmd += ["--layers", str(ns.layers)]
    if ns.activation_checkpointing:
        cmd.append("--activation-checkpointing")
    if ns.liger_kernels:
        cmd.append("--liger-kernels")
    if ns.offload:
        cmd.append("--offload")
    cmd += ["--checkpoint-every", str(ns.checkpoint_every), "--tiled-mlp", str(ns.tiled_mlp)]
    if ns.peak_tflops:
        cmd += ["--peak-tflops", str(ns.peak_tflops)]
    return cmd


def run_method_in_subprocess(method: str, ns) -> dict:
    """A crashed worker (e.g. killed by the host's OOM killer) becomes an `error` row per length."""
    env = dict(os.environ)
    if ns.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        completed = subprocess.run(worker_command(method, ns, out), env=env)
        if completed.returncode == 0 and os.path.exists(out):
            return json.loads(Path(out).read_text())
    error = f"worker exited with code {completed.returncode}"
    return {"meta": {}, "results": [{"method": method, "length": n, "status": "error", "error": error}
                                    for n in sorted(ns.lengths)]}


def format_number(value, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def markdown_table(results: list[dict]) -> str:
    lines = ["| length | method | attn | tokens/s (median) | spread (min-max) | MFU | peak mem (GiB) | runs | status |",
             "|---:|---|---|---:|---:|---:|---:|---:|---|"]
    for r in sorted(results, key=lambda r: (r["length"], METHODS.index(r["method"]))):
        mfu = format_number(r.get("mfu") and 100 * r["mfu"], ".1f") + ("%" if r.get("mfu") else "")
        mfu = "n/a" if r["status"] == "ok" and r.get("mfu") is None else mfu
        runs = r.get("tokens_per_s_runs") or []
        spread = f"{min(runs):,.0f}-{max(runs):,.0f}" if len(runs) > 1 else "-"
        lines.append(
            f"| {r['length']} | {r['method']} | {r.get('attn', '-')} | {format_number(r.get('tokens_per_s'), ',.0f')} "
            f"| {spread} | {mfu} | {format_number(r.get('peak_memory_gib'), '.2f')} | {len(runs) or '-'} | {r['status']} |"
        )
    return "\n".join(lines)


def median_over_repeats(runs: list[dict]) -> dict:
    """One row per (method, length) from its repeats: medians, the per-run figures, the worst status."""
    ok = [r for r in runs if r["status"] == "ok"]
    if len(ok) < len(runs):  # an OOM / crash in any repeat is the row's status
        failed = next(r for r in runs if r["status"] != "ok")
        return {**failed, "repeats": len(runs), "statuses": [r["status"] for r in runs]}
    row = dict(ok[0])
    for key in ("seconds", "tokens_per_s", "step_s", "tflops_per_s", "peak_memory_gib", "mfu"):
        if key in row:
            values = [r[key] for r in ok]
            row[key] = float(np.median(values))
            row[f"{key}_runs"] = values
    row["repeats"] = len(runs)
    return row


def run_all(ns) -> dict:
    started = datetime.datetime.now(datetime.timezone.utc)
    meta, runs, done = {}, {}, 0
    for repeat in range(ns.repeats):
        for method in ns.methods:  # interleaved: A B C A B C ...
            print(f"repeat {repeat + 1}/{ns.repeats}: {method}", file=sys.stderr, flush=True)
            report = run_method_in_subprocess(method, ns)
            meta = meta or dict(report["meta"])
            if method == "prolong" and report["meta"]:
                meta["prolong_loss_kernel"] = report["meta"]["loss_kernel"]
            for r in report["results"]:
                runs.setdefault((r["method"], r["length"]), []).append(r)
            done += 1
            summary = summarise(ns, started, meta, runs, done)
            if ns.json:  # after every run: a run stopped by a time limit keeps what was measured
                write_json(ns.json, summary)
    return summary


def write_json(path: str, report: dict) -> None:
    """Whole or not at all: a process killed mid-write leaves the previous version."""
    tmp = f"{path}.tmp"
    Path(tmp).write_text(json.dumps(report, indent=2))
    os.replace(tmp, path)


def summarise(ns, started, meta: dict, runs: dict, done: int) -> dict:
    """The report over the runs so far (`runs_done` of `runs_planned`)."""
    meta = dict(meta)
    results = [median_over_repeats(rs) for rs in runs.values()]
    memory_kind = next((r["memory_kind"] for r in results if "memory_kind" in r), None)
    meta.update(
        date=started.isoformat(timespec="seconds"),
        command="python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
        shape=ns.shape,
        attn_requested=ns.attn,
        lengths=ns.lengths,
        warmup_steps=ns.warmup,
        timed_steps=ns.steps,
        repeats=ns.repeats,
        order="interleaved: " + " ".join(ns.methods) + " per repeat",
        long_share=ns.long_share,
        activation_checkpointing=ns.activation_checkpointing,
        checkpoint_every=ns.checkpoint_every,
        offload=ns.offload,
        liger_kernels=ns.liger_kernels,
        tiled_mlp_tokens=ns.tiled_mlp,
        loss=ns.loss,
        optimizer=ns.optimizer,
        layers=ns.layers,
        runs_done=done,
        runs_planned=ns.repeats * len(ns.methods),
        memory=memory_kind,
        flops_formula="6 * N * T + 6 * n_layers * d_attn * sum(doc_len^2); N = all parameters but the input "
        "embedding (lm_head counted even if tied); no recomputation, no padding",
    )
    return {"meta": meta, "results": results}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", help="benchmarks/shapes/<name>.json or a path to a config JSON")
    parser.add_argument("--lengths", type=int, nargs="+", help="tokens per row (one row per step)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--attn", default="auto", help="auto | flash_attention_2 | varlen | flex_attention | sdpa")
    parser.add_argument("--warmup", type=int, help="untimed steps per length")
    parser.add_argument("--steps", type=int, help="timed steps per length")
    parser.add_argument("--long-share", type=float, default=LONG_SHARE, help="share of one-document rows")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--offload", action="store_true", help="with --activation-checkpointing: save_on_cpu")
    parser.add_argument("--checkpoint-every", type=int, default=1,
                        help="with --activation-checkpointing: checkpoint every N-th decoder layer only")
    parser.add_argument("--tiled-mlp", type=int, default=0, metavar="TOKENS",
                        help="prolong only: run each MLP on tiles of TOKENS tokens (tiled_mlp_tokens); 0 = off")
    parser.add_argument("--loss", choices=("auto", "chunked", "liger", "trl"), default="auto",
                        help="prolong's loss_kernel (auto: fused on CUDA, chunked on CPU)")
    parser.add_argument("--liger-kernels", action="store_true",
                        help="use_liger_kernel for every method (Liger's layer kernels, CUDA only)")
    parser.add_argument("--repeats", type=int, help="interleaved repeats of every method (median reported)")
    parser.add_argument("--optimizer", choices=("adamw", "none"), default="adamw",
                        help="none: forward + backward only (no optimizer state in memory)")
    parser.add_argument("--layers", type=int, help="the shape with this many decoder layers (default: all)")
    parser.add_argument("--peak-tflops", type=float, help="peak TFLOP/s per device (default: from PEAK_TFLOPS)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="CPU mode (automatic without CUDA): tiny defaults")
    parser.add_argument("--json", help="write every figure and the run's metadata here")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.offload and not ns.activation_checkpointing:
        parser.error("--offload offloads the checkpointed layers' inputs: add --activation-checkpointing")
    if not ns.worker:
        ns.cpu = ns.cpu or not cuda_available()
    defaults = CPU_DEFAULTS if ns.cpu else GPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(ns, key) is None:
            setattr(ns, key, value)
    return ns


def cuda_available() -> bool:
    """Without importing torch in the parent (the workers own the device)."""
    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", probe]).returncode == 0


def main(argv=None) -> None:
    ns = parse_args(argv)
    if ns.worker:
        Path(ns.worker_out).write_text(json.dumps(run_worker(ns.worker, ns)))
        return
    report = run_all(ns)
    meta = report["meta"]
    print(f"\n{meta.get('device')} | shape {ns.shape} | {meta.get('dtype')} | versions {meta.get('versions')}")
    print(f"{ns.warmup} warm-up + {ns.steps} timed steps per length, {ns.repeats} interleaved repeats "
          f"(median, spread min-max), long-document share {ns.long_share}, "
          f"activation checkpointing {ns.activation_checkpointing} (every {ns.checkpoint_every}), offload {ns.offload}, "
          f"Liger layer kernels {ns.liger_kernels}, tiled MLP {ns.tiled_mlp or 'off'}, prolong loss {meta.get('prolong_loss_kernel')}, "
          f"memory = {meta.get('memory')}\n")
    print(markdown_table(report["results"]))
    if ns.json:
        write_json(ns.json, report)


if __name__ == "__main__":
    main()
