"""torchrun child for tests/test_families.py: Ulysses SP over 2 gloo ranks against one process, for
every family of tests/families.py, on the backend ``auto`` picks on CPU (fp32).

    torchrun --nproc_per_node 2 tests/distributed/family_worker.py OUT_DIR

Each case: one packed row (documents 40, 30, 26: longer than the families' 8-token windows, the
second crosses the chunk boundary), the trainer's loss (decoder hidden states, the model's own head
with its bias / soft-cap / scale, chunked CE), gradients of every parameter through DDP.
Rank 0 writes the largest differences to OUT_DIR/results.json.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the family definitions
from families import FAMILIES, family_config, family_model
from parallel_worker import (_count_calls, count_tokens, full_gradients, global_count, max_difference, packed_examples,
                             run_cases)

from prolong.parallel import SequenceParallelCollator, enable_sequence_parallel, init_parallel_layout
from prolong.parallel.sequence import UlyssesAttention
from prolong.training.attention import choose_attn_implementation
from prolong.training.collator import PackedCollator
from prolong.training.loss import chunked_cross_entropy_sum, logit_scale_of, logit_softcap_of

DOCUMENTS = [40, 30, 26]


def loss_sum(model, batch) -> torch.Tensor:
    """CPTTrainer.compute_loss's sum: the decoder's hidden states through the model's own head."""
    inner = model.module if hasattr(model, "module") else model
    captured = {}
    handle = inner.get_decoder().register_forward_hook(lambda _m, _a, out: captured.update(hidden=out.last_hidden_state))
    model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, logits_to_keep=1)
    handle.remove()
    head = inner.get_output_embeddings()
    return chunked_cross_entropy_sum(captured["hidden"], head.weight, batch["shift_labels"], 16,
                                     logit_softcap_of(inner.config), lm_head_bias=head.bias,
                                     logit_scale=logit_scale_of(inner.config))


def sequence_parallel_case(family: str) -> dict:
    layout = init_parallel_layout(sp_size=dist.get_world_size())
    examples = packed_examples([DOCUMENTS], seed=1)
    row = PackedCollator()(examples)
    attn = choose_attn_implementation("auto", family_config(family))
    reference = family_model(family, attn)
    parallel = copy.deepcopy(reference)
    reference.train()
    reference_loss_sum = loss_sum(reference, row)
    (reference_loss_sum / count_tokens(row)).backward()

    enable_sequence_parallel(parallel, layout.sp_group)
    parallel.train()
    model = DistributedDataParallel(parallel)
    local = SequenceParallelCollator(PackedCollator(), layout.sp_rank, layout.sp_size)(examples)
    total = global_count(count_tokens(local))
    gathers = _count_calls(dist, "all_gather")
    local_sum = loss_sum(model, local)
    (local_sum / total * dist.get_world_size()).backward()
    gathers.stop()
    row_sum = local_sum.detach().clone()
    dist.all_reduce(row_sum)
    reference_grads = full_gradients(reference)
    return {
        "attn": attn,
        "inner": parallel.config._attn_implementation,
        "loss_diff": abs(row_sum.item() - reference_loss_sum.item()) / total.item(),
        "grad_diff": max_difference(full_gradients(model), reference_grads),
        "grad_scale": max(g.abs().max().item() for g in reference_grads.values()),
        "position_gathers": gathers.calls,
    }


def window_ignored_control() -> dict:
    """Control: Mistral under SP with the window dropped from the mask (what SP over sdpa did before
    it built sliding-window masks) must NOT match, or the family cases could not see a lost window."""
    original = UlyssesAttention._layer_mask
    UlyssesAttention._layer_mask = lambda self, row, sliding_window, query: row.attention_mask
    try:
        return sequence_parallel_case("mistral")
    finally:
        UlyssesAttention._layer_mask = original


def sdpa_inner_on_gemma2() -> dict:
    """An explicit inner backend that would ignore Gemma 2's attention soft-cap is refused."""
    layout = init_parallel_layout(sp_size=dist.get_world_size())
    try:
        enable_sequence_parallel(family_model("gemma2", "eager"), layout.sp_group, inner="sdpa")
    except Exception as error:  # noqa: BLE001 - the test reads the message
        return {"refused": f"{type(error).__name__}: {error}"}
    return {"refused": None}


CASES = {**{f"sp_{family}": (lambda family=family: sequence_parallel_case(family)) for family in FAMILIES},
         "control_window_ignored": window_ignored_control, "sdpa_inner_on_gemma2": sdpa_inner_on_gemma2}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_cases(CASES, sys.argv[1])
