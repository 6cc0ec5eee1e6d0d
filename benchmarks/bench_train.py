"""Training throughput and memory: ProLong's step vs TRL padding-free vs plain padded Trainer, side by side.

    # GPU (H100/H200): Llama-3.2-1B shape, 8K..64K
    python benchmarks/bench_train.py --shape llama-3.2-1b --lengths 8192 16384 32768 65536 --json out.json
    # CPU (automatic without CUDA, or --cpu): tiny shape, tiny lengths, under a minute
    python benchmarks/bench_train.py --cpu

What is measured, for every sequence length, each method in its own fresh process (so peak memory and
OOM state are the method's own), on the SAME rows of the SAME randomly initialised model:

* ``prolong``: the ``prolong/run_cpt.py`` path. ``PackedCollator`` -> ``CPTTrainer.training_step``
  (our ``compute_loss``: forward with ``logits_to_keep=1``, chunked cross-entropy or Liger's fused
  loss with ``--loss liger``) with the chosen attention backend.
* ``trl-padding-free``: TRL's ``SFTTrainer`` with ``packing=True, packing_strategy="bfd"`` (padding-free
  rows). Each row's documents go through TRL's own ``pack_dataset`` and data collator, then its
  ``training_step``.
* ``hf-padded``: plain ``transformers.Trainer``; the row's documents are one batch padded to the
  longest with an ``attention_mask`` (the baseline users start from). ``varlen`` needs one flat row, so
  this method uses ``sdpa`` when ``varlen`` is asked for (the ``attn`` column says what ran).

One step = ``training_step`` (forward + backward, under the Trainer's autocast) + AdamW step +
``zero_grad`` (no gradient clipping, no scheduler). ``--warmup`` steps run first and are not timed.
Activation checkpointing (``--activation-checkpointing``, of every ``--checkpoint-every``-th decoder
layer) and its CPU offload (``--offload``: the
checkpointed layers' saved tensors go to pinned host memory through
``torch.autograd.graph.save_on_cpu``, transformers' ``activation_checkpointing_kwargs={"offload": True}``)
apply to all three methods alike. ``--tiled-mlp TOKENS`` (our ``tiled_mlp_tokens``) applies to ``prolong`` only.

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
library versions, date and command.
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

CPU_DEFAULTS = {"shape": "tiny", "lengths": [512, 2048], "warmup": 1, "steps": 3}
GPU_DEFAULTS = {"shape": "llama-3.2-1b", "lengths": [8192, 16384, 32768, 65536], "warmup": 2, "steps": 5}


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


def build_model(shape: str, max_length: int, attn: str, device: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from prolong.model import apply_rope_settings

    spec = json.loads(Path(shape_path(shape)).read_text())
    spec.pop("_comment", None)
    config = AutoConfig.for_model(**spec)
    apply_rope_settings(config, rope_theta=None, rope_scaling=None, max_length=max_length)
    config.use_cache = False  # training; every method alike
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # run_cpt.py's dtype "auto"
    with torch.device(device):  # random init directly on the device (an 8B model in seconds)
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)


def shape_path(shape: str) -> str:
    return shape if shape.endswith(".json") else str(SHAPES_DIR / f"{shape}.json")


def trainer_arguments(ns, cuda: bool) -> dict:
    """TrainingArguments fields shared by the three methods."""
    kwargs = dict(
        output_dir=tempfile.mkdtemp(prefix="bench_train-"),
        per_device_train_batch_size=1,
        bf16=cuda,
        use_cpu=not cuda,
        report_to="none",
        save_strategy="no",
        seed=ns.seed,
    )
    if ns.activation_checkpointing:
        kwargs["activation_checkpointing"] = True
        kwargs["activation_checkpointing_kwargs"] = {
            "use_reentrant": False,
            "offload": ns.offload,
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
        from prolong.collator import PackedCollator
        from prolong.config import CPTConfig
        from prolong.trainer import CPTTrainer

        args = CPTConfig(**common, use_liger_kernel=ns.loss == "liger" and cuda, check_document_masking=False,
                         tiled_mlp_tokens=ns.tiled_mlp)
        return CPTTrainer(model=model, args=args, data_collator=PackedCollator())
    if method == "trl-padding-free":
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**common, packing=True, packing_strategy="bfd", max_length=max(ns.lengths))
        dataset = Dataset.from_dict({"input_ids": [doc.tolist() for doc in first_row]})
        return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=stub_tokenizer())
    if method == "hf-padded":
        from transformers import Trainer, TrainingArguments

        return Trainer(model=model, args=TrainingArguments(**common))
    raise ValueError(f"unknown method {method}")


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
    """What Trainer.train does for one micro-batch, then the optimizer step."""
    batches, num_items = trainer.get_batch_samples(iter([batch]), 1, trainer.args.device)
    with trainer.accelerator.autocast():
        trainer.training_step(trainer.model, batches[0], num_items)
    if trainer.optimizer is not None:
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)


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


def run_worker(method: str, ns) -> dict:
    """Build the model and the method's trainer once; measure every length, shortest first."""
    import importlib.metadata as md

    import datasets
    import torch

    from prolong.attention import choose_attn_implementation  # also registers the "varlen" backend

    datasets.disable_progress_bars()  # TRL packs each row with datasets.map
    cuda = torch.cuda.is_available()
    attn = choose_attn_implementation(ns.attn)
    if method == "hf-padded" and attn == "varlen":
        attn = "sdpa"  # varlen needs one flat row; a padded batch has many
    model = build_model(ns.shape, max(ns.lengths), attn, "cuda" if cuda else "cpu")
    first_row = make_rows(min(ns.lengths), [False], model.config.vocab_size, ns.seed)[0]
    trainer = build_trainer(method, model, ns, cuda, first_row)
    if ns.optimizer == "adamw":
        trainer.create_optimizer()
    else:
        trainer.optimizer = None
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
        "dtype": str(model.dtype).removeprefix("torch."),
    }
    return {"meta": meta, "results": results}


# --------------------------------------------------------------------------------------------------
# The run: one worker process per method, then the table (parent process; imports no torch)


def worker_command(method: str, ns, out: str) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--worker-out", out,
           "--shape", ns.shape, "--lengths", *map(str, ns.lengths), "--attn", ns.attn,
           "--warmup", str(ns.warmup), "--steps", str(ns.steps), "--long-share", str(ns.long_share),
           "--loss", ns.loss, "--optimizer", ns.optimizer, "--seed", str(ns.seed)]
    if ns.activation_checkpointing:
        cmd.append("--activation-checkpointing")
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
    lines = ["| length | method | attn | tokens/s | MFU | peak mem (GiB) | status |",
             "|---:|---|---|---:|---:|---:|---|"]
    for r in sorted(results, key=lambda r: (r["length"], METHODS.index(r["method"]))):
        mfu = format_number(r.get("mfu") and 100 * r["mfu"], ".1f") + ("%" if r.get("mfu") else "")
        mfu = "n/a" if r["status"] == "ok" and r.get("mfu") is None else mfu
        lines.append(
            f"| {r['length']} | {r['method']} | {r.get('attn', '-')} | {format_number(r.get('tokens_per_s'), ',.0f')} "
            f"| {mfu} | {format_number(r.get('peak_memory_gib'), '.2f')} | {r['status']} |"
        )
    return "\n".join(lines)


def run_all(ns) -> dict:
    started = datetime.datetime.now(datetime.timezone.utc)
    meta, results = {}, []
    for method in ns.methods:
        report = run_method_in_subprocess(method, ns)
        meta = meta or report["meta"]
        results += report["results"]
    memory_kind = next((r["memory_kind"] for r in results if "memory_kind" in r), None)
    meta.update(
        date=started.isoformat(timespec="seconds"),
        command="python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
        shape=ns.shape,
        attn_requested=ns.attn,
        lengths=ns.lengths,
        warmup_steps=ns.warmup,
        timed_steps=ns.steps,
        long_share=ns.long_share,
        activation_checkpointing=ns.activation_checkpointing,
        checkpoint_every=ns.checkpoint_every,
        offload=ns.offload,
        tiled_mlp_tokens=ns.tiled_mlp,
        loss=ns.loss,
        optimizer=ns.optimizer,
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
    parser.add_argument("--loss", choices=("chunked", "liger"), default="chunked", help="prolong's loss (liger: CUDA)")
    parser.add_argument("--optimizer", choices=("adamw", "none"), default="adamw",
                        help="none: forward + backward only (no optimizer state in memory)")
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
    print(f"{ns.warmup} warm-up + {ns.steps} timed steps per length, long-document share {ns.long_share}, "
          f"activation checkpointing {ns.activation_checkpointing}, offload {ns.offload}, "
          f"tiled MLP {ns.tiled_mlp or 'off'}, loss {ns.loss}, "
          f"memory = {meta.get('memory')}\n")
    print(markdown_table(report["results"]))
    if ns.json:
        Path(ns.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
