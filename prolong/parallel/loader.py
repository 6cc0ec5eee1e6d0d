"""A training DataLoader sharded by DATA-parallel rank, for sequence parallelism.

accelerate (and so the transformers Trainer) deals batches round-robin over ALL processes. With
sequence parallelism the sp_size ranks of a group must read the SAME batch (each then keeps its
own chunk of the row), so batches are dealt over data-parallel ranks instead, with accelerate's
own ``BatchSamplerShard`` (same order and same even-batches rule as a plain accelerate run with
``dp_size`` processes). Do not pass this loader through ``accelerator.prepare``: it would be
sharded a second time.
"""

from __future__ import annotations

from typing import Callable

from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, SequentialSampler

from prolong.parallel.groups import ParallelLayout


def data_parallel_batch_sampler(
    sampler: Sampler, batch_size: int, layout: ParallelLayout, drop_last: bool = False
) -> BatchSamplerShard:
    """Batches of ``sampler`` for this rank's data-parallel rank (identical within an SP group)."""
    return BatchSamplerShard(
        BatchSampler(sampler, batch_size, drop_last),
        num_processes=layout.dp_size,
        process_index=layout.dp_rank,
        split_batches=False,
        even_batches=True,
    )


def sequence_parallel_dataloader(
    dataset: Dataset,
    batch_size: int,
    collate_fn: Callable,
    layout: ParallelLayout,
    sampler: Sampler | None = None,
    **dataloader_kwargs,
) -> DataLoader:
    """``DataLoader`` whose batches are sharded by ``layout.dp_rank``; pair it with a
    ``SequenceParallelCollator`` as ``collate_fn`` so each rank gets its chunk of the row."""
    batch_sampler = data_parallel_batch_sampler(sampler or SequentialSampler(dataset), batch_size, layout)
    return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate_fn, **dataloader_kwargs)
