"""Process groups for sequence parallelism (SP) combined with data parallelism (DP).

The world is cut into groups of ``sp_size`` CONSECUTIVE ranks (ranks 0..sp_size-1 form the first
group, and so on): consecutive ranks usually share a node, so the attention all-to-alls stay on
NVLink. Every rank of an SP group holds one contiguous chunk of the SAME packed row, so the data
loader shards by the data-parallel rank (``rank // sp_size``), not by the global rank.

Gradients are still reduced over the WHOLE world by DDP/FSDP/DeepSpeed: each rank of an SP group
holds the gradient contribution of its own tokens, and their sum is the gradient of the row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelLayout:
    """Where this process sits in the (data parallel x sequence parallel) grid."""

    sp_group: dist.ProcessGroup | None  # None when sp_size == 1
    sp_rank: int  # position of this rank's chunk inside the row
    sp_size: int
    dp_rank: int  # which rows this rank's SP group reads (give it to the sampler)
    dp_size: int  # how many different rows are processed at once (give it to the sampler)


def data_parallel_rank_and_size(rank: int, world_size: int, sp_size: int) -> tuple[int, int]:
    """(dp_rank, dp_size) of a global rank: the sampler shards the data by these, not by rank/world."""
    if sp_size < 1 or world_size % sp_size != 0:
        raise ValueError(
            f"The world size {world_size} must be a multiple of the sequence-parallel size {sp_size} "
            "(each sequence-parallel group is sp_size consecutive ranks)."
        )
    return rank // sp_size, world_size // sp_size


def init_parallel_layout(sp_size: int) -> ParallelLayout:
    """Creates the SP groups (collective: every rank must call it) and returns this rank's layout.

    Call it after ``torch.distributed`` is initialized (by torchrun + ``init_process_group``, or by
    accelerate / the transformers Trainer). With ``sp_size == 1`` it creates nothing.
    """
    if not dist.is_available() or not dist.is_initialized():
        if sp_size != 1:
            raise RuntimeError(f"sequence parallelism (sp_size={sp_size}) needs torch.distributed initialized first.")
        return ParallelLayout(sp_group=None, sp_rank=0, sp_size=1, dp_rank=0, dp_size=1)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    dp_rank, dp_size = data_parallel_rank_and_size(rank, world_size, sp_size)
    if sp_size == 1:
        return ParallelLayout(sp_group=None, sp_rank=0, sp_size=1, dp_rank=dp_rank, dp_size=dp_size)
    # new_subgroups builds [0..sp_size-1], [sp_size..2*sp_size-1], ... on every rank
    sp_group, _ = dist.new_subgroups(group_size=sp_size)
    return ParallelLayout(sp_group=sp_group, sp_rank=rank % sp_size, sp_size=sp_size, dp_rank=dp_rank, dp_size=dp_size)
