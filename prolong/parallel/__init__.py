"""Scale-out helpers: sequence-parallel (Ulysses) attention, process groups, batch sharding.

Typical use (see docs/scale-out.md):

    layout = init_parallel_layout(sp_size)                    # after torch.distributed is up
    enable_sequence_parallel(model, layout.sp_group)          # model uses ulysses_<attn> now
    collator = SequenceParallelCollator(PackedCollator(), layout.sp_rank, layout.sp_size)
    loader = sequence_parallel_dataloader(dataset, batch_size, collator, layout)  # shards by dp_rank
"""

from prolong.parallel.batch import SequenceParallelCollator, pad_row_to_multiple, shard_batch_for_sequence_parallel
from prolong.parallel.groups import ParallelLayout, data_parallel_rank_and_size, init_parallel_layout
from prolong.parallel.loader import data_parallel_batch_sampler, sequence_parallel_dataloader
from prolong.parallel.sequence import (
    UlyssesAttention,
    all_to_all,
    check_model_for_sequence_parallel,
    check_sequence_parallel_heads,
    enable_sequence_parallel,
    register_ulysses_attention,
)

__all__ = [
    "ParallelLayout",
    "SequenceParallelCollator",
    "UlyssesAttention",
    "all_to_all",
    "check_model_for_sequence_parallel",
    "check_sequence_parallel_heads",
    "data_parallel_batch_sampler",
    "data_parallel_rank_and_size",
    "enable_sequence_parallel",
    "init_parallel_layout",
    "pad_row_to_multiple",
    "register_ulysses_attention",
    "sequence_parallel_dataloader",
    "shard_batch_for_sequence_parallel",
]
