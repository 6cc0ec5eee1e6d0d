"""torchrun child for tests/test_parallel_distributed.py (gloo, CPU, fp32).

    torchrun --nproc_per_node 2 tests/distributed/parallel_worker.py OUT_DIR

Every case compares a distributed run with a single-process reference computed in the same
process on the whole global batch, through the repo's loss path: PackedCollator rows, a forward
with ``use_cache=False, logits_to_keep=1``, the decoder's last hidden state caught by a forward
hook, ``chunked_cross_entropy_sum``, divided by the global count of ``shift_labels != -100`` and
multiplied by the world size (DDP/FSDP average gradients over ranks). Rank 0 writes the largest
differences to OUT_DIR/results.json; the test asserts on them.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from prolong.training.collator import IGNORE_INDEX, PackedCollator
from prolong.training.loss import chunked_cross_entropy_sum
from prolong.parallel import (
    SequenceParallelCollator,
    enable_sequence_parallel,
    init_parallel_layout,
)
from prolong.training.memory import enable_tiled_mlp

VOCAB = 128
# GPU runs (docs/scale-out.md): PARALLEL_TEST_BACKEND=nccl PARALLEL_TEST_INNER=flash_attention_2|varlen|flex_attention
# PARALLEL_TEST_DTYPE=bfloat16; the defaults are the CPU test's (gloo, sdpa, float32).
BACKEND = os.environ.get("PARALLEL_TEST_BACKEND", "gloo")
INNER = os.environ.get("PARALLEL_TEST_INNER", "sdpa")
DTYPE = getattr(torch, os.environ.get("PARALLEL_TEST_DTYPE", "float32"))


def device() -> torch.device:
    return torch.device("cuda", int(os.environ["LOCAL_RANK"])) if BACKEND == "nccl" else torch.device("cpu")


def to_device(batch: dict) -> dict:
    return {key: value.to(device()) if torch.is_tensor(value) else value for key, value in batch.items()}


def tiny_model(family: str = "llama", heads: int = 4, kv_heads: int = 2, attn: str = INNER):
    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    config = (LlamaConfig if family == "llama" else Qwen3Config)(**common)
    config._attn_implementation = attn
    if attn == "varlen":
        import prolong.training.attention  # noqa: F401  (registers the varlen backend)
    model = (LlamaForCausalLM if family == "llama" else Qwen3ForCausalLM)(config)
    return model.to(device=device(), dtype=DTYPE)


def packed_examples(document_lengths: list[list[int]], seed: int) -> list[dict]:
    """One packed example per inner list, documents of the given lengths."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for lengths in document_lengths:
        ids = torch.randint(1, VOCAB, (sum(lengths),), generator=generator).tolist()
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        examples.append({"input_ids": ids, "indices": [[s, s + n] for s, n in zip(starts, lengths)]})
    return examples


def loss_sum(model, batch) -> torch.Tensor:
    """The trainer's loss path: hidden states from the decoder, chunked CE summed over valid tokens."""
    captured = {}
    decoder = (model.module if hasattr(model, "module") else model).get_decoder()
    handle = decoder.register_forward_hook(lambda _m, _a, output: captured.update(hidden=output.last_hidden_state))
    model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, logits_to_keep=1)
    handle.remove()
    lm_head = (model.module if hasattr(model, "module") else model).lm_head.weight
    return chunked_cross_entropy_sum(captured["hidden"], lm_head, batch["shift_labels"], chunk_size=16)


def count_tokens(batch) -> torch.Tensor:
    return (batch["shift_labels"] != IGNORE_INDEX).sum()


def global_count(local_count: torch.Tensor) -> torch.Tensor:
    """What the Trainer does with average_tokens_across_devices: sum the counts of all processes."""
    total = local_count.clone()
    dist.all_reduce(total)
    return total


def reference_step(model, batches: list[dict]) -> float:
    """Single process, gradient accumulation over the micro-batches of the whole global batch."""
    total = sum(count_tokens(b) for b in batches)
    loss = 0.0
    for batch in batches:
        micro = loss_sum(model, batch) / total
        micro.backward()
        loss += micro.item()
    return loss


def full_gradients(model) -> dict[str, torch.Tensor]:
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad
        if hasattr(grad, "full_tensor"):  # FSDP2 DTensor shard
            grad = grad.full_tensor()
        grads[name.removeprefix("module.")] = grad.detach().clone()
    return grads


def full_parameters(model) -> dict[str, torch.Tensor]:
    params = {}
    for name, param in model.named_parameters():
        value = param.full_tensor() if hasattr(param, "full_tensor") else param
        params[name.removeprefix("module.")] = value.detach().clone()
    return params


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (a.keys() ^ b.keys())
    return max((a[k] - b[k]).abs().max().item() for k in a)


def sequence_parallel_case(document_lengths, family="llama", heads=4, kv_heads=2, inner=INNER,
                           wrap="ddp", checkpointing=False, reference_lengths=None, tiled_mlp=0) -> dict:
    """SP over the whole world (2 ranks, one row) vs. one process on the whole row.

    ``reference_lengths`` (a control) gives the reference other document boundaries over the same tokens.
    """
    layout = init_parallel_layout(sp_size=dist.get_world_size())
    examples = packed_examples([document_lengths], seed=1)
    row = to_device(PackedCollator()(packed_examples([reference_lengths], seed=1) if reference_lengths else examples))

    reference = tiny_model(family, heads, kv_heads, attn=inner)
    parallel = copy.deepcopy(reference)
    reference_loss = reference_step(reference, [row])

    enable_sequence_parallel(parallel, layout.sp_group)
    if tiled_mlp:
        enable_tiled_mlp(parallel, tiled_mlp)
    if checkpointing:
        parallel.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    parallel.train()
    model = DistributedDataParallel(parallel) if wrap == "ddp" else _fully_shard(parallel)
    local = to_device(SequenceParallelCollator(PackedCollator(), layout.sp_rank, layout.sp_size)(examples))
    total = global_count(count_tokens(local))
    gathers = _count_calls(dist, "all_gather")
    local_sum = loss_sum(model, local)
    (local_sum / total * dist.get_world_size()).backward()
    gathers.stop()
    row_sum = local_sum.detach().clone()
    dist.all_reduce(row_sum)
    return {
        "loss_diff": abs(row_sum.item() / total.item() - reference_loss),
        "grad_diff": max_difference(full_gradients(model), full_gradients(reference)),
        "grad_scale": max(g.abs().max().item() for g in full_gradients(reference).values()),
        "token_count_matches": int(total.item() == count_tokens(row).item()),
        "chunk_length": int(local["input_ids"].shape[-1]),
        "position_gathers": gathers.calls,  # once per forward, not once per layer or recomputation
    }


class _count_calls:
    """Counts calls of ``owner.name`` until ``stop()``."""

    def __init__(self, owner, name: str):
        self.owner, self.name, self.original, self.calls = owner, name, getattr(owner, name), 0

        def counted(*args, **kwargs):
            self.calls += 1
            return self.original(*args, **kwargs)

        setattr(owner, name, counted)

    def stop(self):
        setattr(self.owner, self.name, self.original)


def _fully_shard(model):
    for layer in model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def data_parallel_case(wrap: str, tiled_mlp: int = 0) -> dict:
    """2 data-parallel ranks (DDP or FSDP2), one micro-batch each, vs. one process accumulating both."""
    layout = init_parallel_layout(sp_size=1)
    examples = packed_examples([[20, 12], [32], [7, 9, 16], [25, 7]], seed=2)
    sampler = DistributedSampler(examples, num_replicas=layout.dp_size, rank=layout.dp_rank, shuffle=False)
    collate = PackedCollator()
    # the sampler deals examples round-robin: rank r gets examples r, r + dp_size, ...
    rank_batches = [
        to_device(collate([examples[i] for i in range(r, len(examples), layout.dp_size)])) for r in range(layout.dp_size)
    ]
    local = to_device(collate([examples[i] for i in sampler]))

    reference = tiny_model()
    parallel = copy.deepcopy(reference)
    if tiled_mlp:
        enable_tiled_mlp(parallel, tiled_mlp)
    reference_loss = reference_step(reference, rank_batches)
    reference_grads = full_gradients(reference)
    torch.optim.AdamW(reference.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1).step()

    model = DistributedDataParallel(parallel) if wrap == "ddp" else _fully_shard(parallel)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    total = global_count(count_tokens(local))
    local_sum = loss_sum(model, local)
    (local_sum / total * dist.get_world_size()).backward()
    grads = full_gradients(model)
    optimizer.step()
    summed = local_sum.detach().clone()
    dist.all_reduce(summed)
    return {
        "loss_diff": abs(summed.item() / total.item() - reference_loss),
        "grad_diff": max_difference(grads, reference_grads),
        "param_diff_after_step": max_difference(full_parameters(model), full_parameters(reference)),
    }


CASES = {
    # 96 tokens, chunks of 48: the second document (40..70) crosses the chunk boundary
    "sp_crossing_document": lambda: sequence_parallel_case([40, 30, 26]),
    # every document fits inside one chunk (ProLong's original SP cut documents here)
    "sp_documents_inside_chunks": lambda: sequence_parallel_case([24, 24, 20, 28]),
    # 97 tokens: padded to 98 with a dummy document
    "sp_padded_odd_length": lambda: sequence_parallel_case([50, 47]),
    "sp_gqa_kv_less_than_sp": lambda: sequence_parallel_case([40, 30, 26], kv_heads=1),
    "sp_gqa_kv_more_than_sp": lambda: sequence_parallel_case([40, 30, 26], heads=8, kv_heads=4),
    "sp_eager_inner": lambda: sequence_parallel_case([40, 30, 26], inner="eager"),
    "sp_many_short_documents": lambda: sequence_parallel_case([3, 1, 9, 2, 30, 5, 17, 1, 28]),
    "sp_qwen3": lambda: sequence_parallel_case([40, 30, 26], family="qwen3"),
    "sp_gradient_checkpointing": lambda: sequence_parallel_case([40, 30, 26], checkpointing=True),
    "sp_fsdp2": lambda: sequence_parallel_case([40, 30, 26], wrap="fsdp2"),
    # tiled MLP (8-token tiles of each 48-token chunk) inside FSDP2 + checkpointing + SP
    "sp_fsdp2_tiled_mlp_checkpointing": lambda: sequence_parallel_case(
        [40, 30, 26], wrap="fsdp2", checkpointing=True, tiled_mlp=8
    ),
    # control: the same tokens with the crossing document cut at the chunk boundary (what ProLong's
    # original SP computed) must NOT match, or the comparisons above could not see a cut document
    "control_cut_document_differs": lambda: sequence_parallel_case([40, 30, 26], reference_lengths=[40, 8, 22, 26]),
    "ddp_vs_single_process": lambda: data_parallel_case("ddp"),
    "fsdp2_vs_single_process": lambda: data_parallel_case("fsdp2"),
    "ddp_tiled_mlp_vs_single_process": lambda: data_parallel_case("ddp", tiled_mlp=8),
    "fsdp2_tiled_mlp_vs_single_process": lambda: data_parallel_case("fsdp2", tiled_mlp=8),
}


def run_cases(cases: dict, out_dir: str) -> None:
    """Run every case on every rank (one failing case is reported, not fatal); rank 0 writes results.json."""
    dist.init_process_group(BACKEND, timeout=timedelta(seconds=120))
    if BACKEND == "nccl":
        torch.cuda.set_device(device())
    else:
        torch.use_deterministic_algorithms(True)
    results = {}
    for name, case in cases.items():
        try:
            results[name] = case()
        except Exception as error:  # noqa: BLE001 - report, so the test shows which case broke and why
            results[name] = {"error": f"{type(error).__name__}: {error}"}
        dist.barrier()
    if dist.get_rank() == 0:
        Path(out_dir, "results.json").write_text(json.dumps(results, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_cases(CASES, sys.argv[1])
