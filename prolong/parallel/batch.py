"""Cuts one collated packed row into the contiguous chunk a sequence-parallel rank computes.

Input: the output of ``prolong.training.collator.PackedCollator`` (one row ``[1, T]`` with per-document
``position_ids`` and globally shifted ``shift_labels``). Output: the same keys, sliced to
``[1, T / sp_size]`` for ``sp_rank``.

* ``shift_labels`` were shifted over the WHOLE row before slicing, so the target of a chunk's last
  token (the first token of the next chunk) is kept, and the sum of the per-chunk loss sums is the
  loss sum of the row. Counting ``shift_labels != -100`` on the chunks counts every loss token
  exactly once across the group.
* ``position_ids`` keep their per-document values, so each rank applies RoPE to its chunk with the
  right positions, and the Ulysses attention gathers them to rebuild the global document mask.
* ``labels`` is dropped: shifting a chunk locally would lose one target at every chunk boundary.
* A row whose length does not divide by ``sp_size`` gets a padding document at its end: its own
  positions restart at 0 (so it attends only to itself, and sdpa/flex/flash all see it as a
  separate document) and its targets are all -100 (so it adds nothing to the loss or the count).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from prolong.training.collator import IGNORE_INDEX, VARLEN_KWARGS

ROW_KEYS = ("input_ids", "position_ids", "shift_labels")


def pad_row_to_multiple(batch: dict[str, torch.Tensor], multiple: int, pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Appends a dummy document so the row length is a multiple of ``multiple`` (no-op if it is)."""
    length = batch["input_ids"].shape[-1]
    pad = -length % multiple
    if pad == 0:
        return batch
    padded = dict(batch)
    padded["input_ids"] = _append(batch["input_ids"], torch.full((pad,), pad_token_id))
    padded["position_ids"] = _append(batch["position_ids"], torch.arange(pad))  # restart: a document of its own
    padded["shift_labels"] = _append(batch["shift_labels"], torch.full((pad,), IGNORE_INDEX))
    if "labels" in batch:
        padded["labels"] = _append(batch["labels"], torch.full((pad,), IGNORE_INDEX))
    if "document_lengths" in batch:
        padded["document_lengths"] = torch.cat([batch["document_lengths"], torch.tensor([pad])])
    if "cu_seq_lens_q" in batch:
        cu_seq_lens = torch.cat([batch["cu_seq_lens_q"], batch["cu_seq_lens_q"][-1:] + pad])
        padded["cu_seq_lens_q"] = padded["cu_seq_lens_k"] = cu_seq_lens
        padded["max_length_q"] = padded["max_length_k"] = max(batch["max_length_q"], pad)
    return padded


def shard_batch_for_sequence_parallel(
    batch: dict[str, torch.Tensor],
    sp_rank: int,
    sp_size: int,
    pad_token_id: int = 0,
    pad_to_multiple: bool = True,
) -> dict[str, torch.Tensor]:
    """This rank's contiguous chunk of a packed row (see the module docstring)."""
    if "attention_mask" in batch:
        raise ValueError(
            "sequence parallelism needs padding-free packed rows (position_ids, no attention_mask); "
            "use prolong.training.collator.PackedCollator."
        )
    missing = [key for key in ROW_KEYS if key not in batch]
    if missing:
        raise ValueError(f"a packed batch for sequence parallelism needs {ROW_KEYS}; missing {missing}.")
    if batch["input_ids"].shape[0] != 1:
        raise ValueError(f"expected one flattened row, got a batch of shape {tuple(batch['input_ids'].shape)}.")
    if sp_size == 1:
        return batch
    if pad_to_multiple:
        batch = pad_row_to_multiple(batch, sp_size, pad_token_id)
    length = batch["input_ids"].shape[-1]
    if length % sp_size != 0:
        raise ValueError(
            f"the row length {length} does not divide by the sequence-parallel size {sp_size}; "
            "pass pad_to_multiple=True or pack sequences to a multiple of sp_size."
        )
    chunk = length // sp_size
    # labels: see above; the collator's cu_seq_lens / max_length describe the unpadded whole row, and
    # the Ulysses attention rebuilds them from the gathered positions once per forward
    sharded = {key: value for key, value in batch.items() if key != "labels" and key not in VARLEN_KWARGS}
    for key in ROW_KEYS:
        sharded[key] = batch[key][:, sp_rank * chunk : (sp_rank + 1) * chunk].contiguous()
    # document_lengths stays global (with the padding document): it describes the whole row
    return sharded


@dataclass
class SequenceParallelCollator:
    """Wraps a packed collator so each rank gets its chunk straight from the data loader.

    Sharding in the collator (before the Trainer counts ``shift_labels``) keeps the Trainer's
    global token count exact: every loss token is counted on exactly one rank.
    """

    collator: Callable[[list[dict]], dict[str, torch.Tensor]]
    sp_rank: int
    sp_size: int
    pad_token_id: int = 0

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return shard_batch_for_sequence_parallel(self.collator(examples), self.sp_rank, self.sp_size, self.pad_token_id)


def _append(row: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    return torch.cat([row, tail.to(dtype=row.dtype, device=row.device)[None]], dim=-1)
