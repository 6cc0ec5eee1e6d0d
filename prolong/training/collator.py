"""Turns packed sequences into one flat, document-masked training row.

A packed example is ``{"input_ids": [...], "indices": [[start, end), ...], "mask": [...]?}``
(the format written by ``prolong-data pack``). The collator concatenates every example of a
micro-batch into ONE row of shape ``[1, total_tokens]``:

* ``position_ids`` restart at 0 at every document start. transformers' attention backends
  (flash-attn varlen, flex_attention, sdpa/eager) read document boundaries from these restarts,
  and our sequence-parallel and varlen backends read them too.
* ``labels`` is ``-100`` on the first token of every document (and where ``mask`` is 0), so no
  target ever crosses a document boundary; ``shift_labels`` is the same, already shifted by one
  (``shift_labels[t]`` is the target of position ``t``). The Trainer counts ``shift_labels`` to
  know the number of loss tokens of the whole optimizer step.
* No ``attention_mask``: an all-ones mask would make transformers ignore the packing.
* ``cu_seq_lens_q/k`` and ``max_length_q/k`` (transformers' ``FlashAttentionKwargs``, as its
  ``DataCollatorWithFlattening`` emits them): the same boundaries, computed here on the CPU, so the
  varlen kernels (flash-attn, our ``varlen``) need no per-layer boundary search and host sync.
  Backends with a mask builder (sdpa, eager, flex) ignore them and read ``position_ids``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100
# transformers' FlashAttentionKwargs: document boundaries for the varlen kernels (see above)
VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
# collator outputs for the loss and the logs; everything else goes to the model
NOT_MODEL_INPUTS = ("labels", "shift_labels", "document_lengths")


def document_lengths(example: dict) -> list[int]:
    """Lengths of the documents (spans) of one packed example."""
    spans = example.get("indices")
    if spans is None or len(spans) == 0:
        return [len(example["input_ids"])]
    return [int(end) - int(start) for start, end in spans]


@dataclass
class PackedCollator:
    """Collates packed examples into one flat row with per-document positions and labels."""

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor | int]:
        ids_parts, label_parts, position_parts, lengths = [], [], [], []
        for example in examples:
            ids = np.asarray(example["input_ids"], dtype=np.int64)
            doc_lens = np.asarray(document_lengths(example), dtype=np.int64)
            spans = example.get("indices")
            contiguous = spans is None or len(spans) == 0 or (
                int(spans[0][0]) == 0 and all(int(a[1]) == int(b[0]) for a, b in zip(spans, spans[1:]))
            )
            if not contiguous or doc_lens.sum() != len(ids) or (doc_lens <= 0).any():
                raise ValueError(
                    f"`indices` {example.get('indices')} do not cover the {len(ids)} tokens of the "
                    "example exactly; re-pack the data with `prolong-data pack`."
                )
            starts = np.concatenate([[0], np.cumsum(doc_lens)[:-1]])
            labels = ids.copy()
            labels[starts] = IGNORE_INDEX  # no target crosses a document boundary
            if example.get("mask") is not None:
                labels[np.asarray(example["mask"]) == 0] = IGNORE_INDEX
            ids_parts.append(ids)
            label_parts.append(labels)
            position_parts.append(np.arange(len(ids)) - np.repeat(starts, doc_lens))
            lengths.extend(doc_lens.tolist())

        labels = np.concatenate(label_parts)
        shift_labels = np.append(labels[1:], IGNORE_INDEX)
        cu_seq_lens = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        return {
            "input_ids": torch.from_numpy(np.concatenate(ids_parts))[None],
            "position_ids": torch.from_numpy(np.concatenate(position_parts))[None],
            "labels": torch.from_numpy(labels)[None],
            "shift_labels": torch.from_numpy(shift_labels)[None],
            "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": max(lengths),
            "max_length_k": max(lengths),
            # per-document lengths, for load balancing and FLOP accounting (not a model input)
            "document_lengths": torch.tensor(lengths, dtype=torch.int64),
        }
