"""Single-process checks of the scale-out helpers: batch sharding, layouts, errors, configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from prolong.training.collator import IGNORE_INDEX, VARLEN_KWARGS, PackedCollator
from prolong.parallel import (
    ParallelLayout,
    check_model_for_sequence_parallel,
    check_sequence_parallel_heads,
    data_parallel_batch_sampler,
    data_parallel_rank_and_size,
    init_parallel_layout,
    pad_row_to_multiple,
    shard_batch_for_sequence_parallel,
)
from torch.utils.data import SequentialSampler

REPO = Path(__file__).resolve().parents[1]


def packed_row(lengths):
    ids = list(range(1, sum(lengths) + 1))
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    return PackedCollator()([{"input_ids": ids, "indices": [[s, s + n] for s, n in zip(starts, lengths)]}])


def test_chunks_reassemble_the_row_and_keep_global_shift():
    row = packed_row([5, 7, 4])  # 16 tokens, sp 4: documents cross chunk boundaries
    chunks = [shard_batch_for_sequence_parallel(row, rank, 4) for rank in range(4)]
    for key in ("input_ids", "position_ids", "shift_labels"):
        assert torch.equal(torch.cat([c[key] for c in chunks], dim=-1), row[key])
    # the target of a chunk's last token is the next chunk's first token (shifted before slicing)
    assert chunks[0]["shift_labels"][0, -1] == row["input_ids"][0, 4]  # inside document 1
    assert chunks[1]["shift_labels"][0, -1] == row["input_ids"][0, 8]  # inside document 2
    assert sum(int((c["shift_labels"] != IGNORE_INDEX).sum()) for c in chunks) == int(
        (row["shift_labels"] != IGNORE_INDEX).sum()
    )
    assert all("labels" not in c for c in chunks)  # a local shift would drop boundary targets
    assert torch.equal(chunks[2]["document_lengths"], row["document_lengths"])


def test_padding_is_a_separate_dummy_document():
    row = packed_row([6, 5])  # 11 tokens, sp 4 -> padded to 12
    chunks = [shard_batch_for_sequence_parallel(row, rank, 4, pad_token_id=0) for rank in range(4)]
    positions = torch.cat([c["position_ids"] for c in chunks], dim=-1)[0]
    labels = torch.cat([c["shift_labels"] for c in chunks], dim=-1)[0]
    assert positions.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 0]  # the pad restarts at 0
    assert labels[-2:].tolist() == [IGNORE_INDEX, IGNORE_INDEX]  # last real token and pad learn nothing
    assert chunks[0]["document_lengths"].tolist() == [6, 5, 1]
    # the collator's whole-row boundaries would be wrong on a chunk: Ulysses rebuilds them
    assert not any(key in chunk for chunk in chunks for key in VARLEN_KWARGS)
    padded = pad_row_to_multiple(row, 4)
    assert padded["cu_seq_lens_q"].tolist() == [0, 6, 11, 12] and padded["max_length_q"] == 6


def test_length_not_divisible_without_padding_is_a_clear_error():
    with pytest.raises(ValueError, match="does not divide by the sequence-parallel size 4"):
        shard_batch_for_sequence_parallel(packed_row([6, 5]), 0, 4, pad_to_multiple=False)


def test_attention_mask_batches_are_refused():
    row = {**packed_row([4, 4]), "attention_mask": torch.ones(1, 8)}
    with pytest.raises(ValueError, match="padding-free"):
        shard_batch_for_sequence_parallel(row, 0, 2)


@pytest.mark.parametrize(
    "heads, kv_heads, sp, message",
    [
        (6, 6, 4, "num_attention_heads=6 does not divide by sp_size=4"),
        (12, 3, 2, "num_key_value_heads=3 and sp_size=2"),
        (8, 3, 4, "num_key_value_heads=3 and sp_size=4"),
    ],
)
def test_head_counts_that_cannot_be_split_raise(heads, kv_heads, sp, message):
    with pytest.raises(ValueError, match=message):
        check_sequence_parallel_heads(heads, kv_heads, sp)


@pytest.mark.parametrize("heads, kv_heads, sp", [(32, 8, 8), (32, 8, 16), (32, 8, 4), (4, 1, 2), (28, 4, 4)])
def test_head_counts_that_split(heads, kv_heads, sp):
    check_sequence_parallel_heads(heads, kv_heads, sp)  # Llama-3-8B at SP 8/16/4, MQA, Qwen2-7B


def test_model_config_check_reads_llama_and_qwen_configs():
    from transformers import LlamaConfig, Qwen2Config

    with pytest.raises(ValueError, match="num_attention_heads=6"):
        check_model_for_sequence_parallel(LlamaConfig(num_attention_heads=6, num_key_value_heads=2, hidden_size=96), 4)
    check_model_for_sequence_parallel(Qwen2Config(num_attention_heads=4, num_key_value_heads=2, hidden_size=64), 2)


def test_sliding_window_models_are_accepted_with_sequence_parallelism():
    """Ulysses builds each layer's sliding-window mask for the whole row (tests/test_families.py checks
    SP against one process for the windowed families)."""
    from transformers import MistralConfig, Qwen2Config

    small = dict(num_attention_heads=4, num_key_value_heads=2, hidden_size=64)
    check_model_for_sequence_parallel(MistralConfig(**small, sliding_window=4096), 2)  # Mistral v0.1
    check_model_for_sequence_parallel(Qwen2Config(**small, use_sliding_window=True, sliding_window=4096), 2)


def test_data_parallel_layout_of_consecutive_sp_groups():
    # 8 ranks, sp 4: ranks 0-3 read row stream 0, ranks 4-7 row stream 1
    assert [data_parallel_rank_and_size(r, 8, 4) for r in (0, 3, 4, 7)] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    with pytest.raises(ValueError, match="multiple of the sequence-parallel size 3"):
        data_parallel_rank_and_size(0, 8, 3)
    assert init_parallel_layout(1).dp_size == 1  # no torch.distributed: a single process
    with pytest.raises(RuntimeError, match="needs torch.distributed"):
        init_parallel_layout(2)


def test_batches_are_dealt_by_data_parallel_rank():
    dataset = list(range(12))

    def batches(rank, world, sp):
        dp_rank, dp_size = data_parallel_rank_and_size(rank, world, sp)
        layout = ParallelLayout(None, rank % sp, sp, dp_rank, dp_size)
        return list(data_parallel_batch_sampler(SequentialSampler(dataset), 2, layout))

    assert batches(0, 4, 2) == batches(1, 4, 2) == [[0, 1], [4, 5], [8, 9]]  # one SP group, same rows
    assert batches(2, 4, 2) == batches(3, 4, 2) == [[2, 3], [6, 7], [10, 11]]
    assert batches(1, 2, 1) == [[2, 3], [6, 7], [10, 11]]  # without SP: accelerate's plain dealing


def test_ulysses_names_register_with_transformers():
    """set_attn_implementation accepts the registered name; the model then skips its own (local) mask."""
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from prolong.parallel.sequence import register_ulysses_attention

    group = object()  # never used: only registration and mask dispatch are checked
    original = dist.get_world_size
    dist.get_world_size = lambda g=None: 2
    try:
        name = register_ulysses_attention("sdpa", group)
    finally:
        dist.get_world_size = original
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
                         intermediate_size=64, vocab_size=32)
    model = LlamaForCausalLM(config)
    model.set_attn_implementation(name)
    assert model.config._attn_implementation == "ulysses_sdpa"
    from transformers.masking_utils import create_causal_mask

    positions = torch.tensor([[3, 4, 0, 1]])
    assert create_causal_mask(model.config, torch.zeros(1, 4, 8), None, None, position_ids=positions) is None


def test_accelerate_configs_parse_and_name_their_backend():
    configs = {p.name: yaml.safe_load(p.read_text()) for p in (REPO / "accelerate_configs").glob("*.yaml")}
    assert {"ddp.yaml", "fsdp2.yaml", "deepspeed_zero3.yaml", "deepspeed_zero3_offload.yaml",
            "multi_node_fsdp2.yaml"} <= configs.keys()
    assert configs["ddp.yaml"]["distributed_type"] == "MULTI_GPU"
    for name in ("fsdp2.yaml", "multi_node_fsdp2.yaml"):
        fsdp = configs[name]["fsdp_config"]
        assert configs[name]["distributed_type"] == "FSDP" and fsdp["fsdp_version"] == 2
        assert fsdp["fsdp_activation_checkpointing"] and fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert configs["multi_node_fsdp2.yaml"]["num_machines"] > 1
    import json

    for name in ("deepspeed_zero3.yaml", "deepspeed_zero3_offload.yaml"):
        assert configs[name]["distributed_type"] == "DEEPSPEED"
        ds = json.loads((REPO / configs[name]["deepspeed_config"]["deepspeed_config_file"]).read_text())
        assert ds["zero_optimization"]["stage"] == 3
        offloaded = ds["zero_optimization"].get("offload_optimizer", {}).get("device")
        assert offloaded == ("cpu" if "offload" in name else None)


def test_slurm_launcher_is_valid_bash():
    import subprocess

    script = REPO / "scripts" / "slurm_launch.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    for flag in ("--num_machines", "--machine_rank", "--main_process_ip", "--config_file", "prolong/run_cpt.py"):
        assert flag in text


def test_the_preemption_flag_under_an_nccl_launch_is_agreed_over_gloo_with_the_runs_timeout(monkeypatch):
    """Under NCCL the flag (a host tensor, no device sync) is all-reduced over a gloo group made at the
    start of training. Its timeout is the run's ddp_timeout, as the default group's: gloo's own 30 min
    would end the run while the other ranks wait for one writing a large checkpoint. (NCCL cannot
    run on CPU: the default group is gloo here and reports itself as nccl.)"""
    import datetime
    from types import SimpleNamespace

    import torch.distributed as dist
    from transformers import TrainerControl, TrainerState

    from prolong.training.callbacks import PreemptionCallback

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                            timeout=datetime.timedelta(hours=2))
    callback = PreemptionCallback()
    args = SimpleNamespace(ddp_timeout=7200)  # what the callback reads of TrainingArguments
    try:
        monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
        callback.on_train_begin(args, TrainerState(), TrainerControl())
        assert callback._group is not None  # its own gloo group, not the (NCCL) default one
        assert callback._group._get_backend(torch.device("cpu")).options._timeout == datetime.timedelta(hours=2)
        assert not callback.on_step_end(args, TrainerState(), TrainerControl()).should_training_stop
        callback.requested = True  # as the SIGTERM / SIGUSR1 handler does
        control = callback.on_step_end(args, TrainerState(), TrainerControl())
        assert control.should_training_stop and control.should_save
    finally:
        callback.on_train_end(args, TrainerState(), TrainerControl())
        dist.destroy_process_group()
