"""Ulysses sequence parallelism, plugged into transformers as an attention implementation.

Every rank of a sequence-parallel (SP) group of size P holds a contiguous chunk of T/P tokens of
one packed row. Everything but attention is per token, so the model runs unchanged on the chunk:
embeddings, RMSNorm, MLP, and RoPE (applied by the model's own attention module, with the chunk's
own per-document ``position_ids``). Only the attention core needs the whole sequence; this module
registers ``ulysses_<inner>`` implementations (``ulysses_sdpa``, ``ulysses_flex_attention``,
``ulysses_flash_attention_2``, ``ulysses_varlen`` from ``prolong.training.attention``, ...) that wrap the
``<inner>`` backend registered in transformers' ``AttentionInterface``:

1. all-to-all: ``[1, H, T/P, D]`` per rank -> ``[1, H/P, T, D]``: the full sequence for H/P heads;
2. the inner backend runs on the full sequence with the GLOBAL ``position_ids`` (all-gathered
   once per forward and cached), so the document mask is the one of the whole row: a document
   that crosses a chunk boundary is attended whole, and no document is ever cut (whatever the
   document lengths, unlike ProLong's original SP, its issue 17);
3. all-to-all back: ``[1, T, H/P, D]`` -> ``[1, T/P, H, D]``, which the model's ``o_proj`` expects.

Grouped-query attention (H query heads, K key/value heads) without repeating K/V to H heads:

* K % P == 0: K/V heads are split like query heads. Rank r gets query heads [rH/P, (r+1)H/P) and
  K/V heads [rK/P, (r+1)K/P): exactly the K/V heads those query heads use.
* K < P (P % K == 0): the H/P query heads of rank r all share ONE K/V head, r // (P/K). Each rank
  needs that one head over the full sequence, which is the minimum; so each local K/V head is
  repeated P/K times before the all-to-all (one copy per rank that needs it). The inner backend
  then sees H/P query heads and one K/V head (``num_key_value_groups = H/P``) and broadcasts it
  itself (``enable_gqa`` or ``repeat_kv`` in transformers, natively in flash-attn).
* anything else cannot be split evenly: ``check_sequence_parallel_heads`` raises.

The model's own mask creation is skipped (``ulysses_*`` has no entry in transformers'
``ALL_MASK_ATTENTION_FUNCTIONS``, so ``create_causal_mask`` returns None): a mask built from one
chunk's positions would be meaningless. The global mask is built here instead, once per forward,
by transformers' ``create_causal_mask`` for the inner backend (dense block-diagonal for
sdpa/eager, a sparse BlockMask for flex) or ``cu_seq_lens`` for flash-attn varlen; backends that
have no mask builder (like ``varlen``) read the global ``position_ids`` themselves.

Sliding-window layers (Mistral, Gemma 2/3, OLMo 3, Phi-3, Qwen2 with ``use_sliding_window``) pass
their window to the attention function as ``sliding_window``: mask-built backends get the row's
sliding-window mask (``create_sliding_window_causal_mask``, built once per window and forward),
flash / varlen take the window as an argument. Soft-capping and other kwargs reach the inner
backend unchanged; ``enable_sequence_parallel`` refuses an inner backend that would ignore them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import (ALL_MASK_ATTENTION_FUNCTIONS, create_causal_mask,
                                        create_sliding_window_causal_mask)
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from prolong.training.attention import VARLEN, choose_attn_implementation
from prolong.training.collator import VARLEN_KWARGS

ULYSSES_PREFIX = "ulysses_"


def check_sequence_parallel_heads(num_heads: int, num_kv_heads: int, sp_size: int) -> None:
    """Raises a clear error when the heads cannot be split over ``sp_size`` ranks."""
    if num_heads % sp_size != 0:
        raise ValueError(
            f"Ulysses sequence parallelism gives each rank num_attention_heads / sp_size heads, but "
            f"num_attention_heads={num_heads} does not divide by sp_size={sp_size}. "
            f"Use an sp_size that divides {num_heads}."
        )
    if num_kv_heads % sp_size != 0 and sp_size % num_kv_heads != 0:
        raise ValueError(
            f"num_key_value_heads={num_kv_heads} and sp_size={sp_size}: one must divide the other "
            "(K/V heads are split when num_key_value_heads >= sp_size, replicated when smaller)."
        )


def check_model_for_sequence_parallel(config, sp_size: int) -> None:
    """Checks a model config (Llama/Qwen-style) before training with ``sp_size``."""
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    check_sequence_parallel_heads(num_heads, num_kv_heads, sp_size)


class _AllToAll(torch.autograd.Function):
    """Splits ``x`` along ``scatter_dim`` over the group and concatenates what arrives along
    ``gather_dim``; its gradient is the inverse exchange (gather_dim and scatter_dim swapped)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.scatter_dim, ctx.gather_dim, ctx.group = scatter_dim, gather_dim, group
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return _all_to_all(grad_output, ctx.gather_dim, ctx.scatter_dim, ctx.group), None, None, None


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    group_size = dist.get_world_size(group)
    send = torch.stack(x.chunk(group_size, dim=scatter_dim)).contiguous()  # send[i] goes to rank i
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)  # received[i] came from rank i
    return torch.cat(received.unbind(0), dim=gather_dim)


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Autograd-aware all-to-all over an SP group (see ``_AllToAll``)."""
    return _AllToAll.apply(x, scatter_dim, gather_dim, group)


@dataclass
class _GlobalRow:
    """What every layer's attention needs about the whole row; built once per forward."""

    local_position_ids: torch.Tensor  # the cache key: the model passes this same tensor to every layer
    position_ids: torch.Tensor  # [1, T] per-document positions of the whole row
    attention_mask: Any  # the inner backend's mask for the row (None for flash / one document)
    varlen_kwargs: dict[str, Any] = field(default_factory=dict)  # cu_seq_lens for flash-attn
    window_masks: dict[int, Any] = field(default_factory=dict)  # sliding window -> the row's mask


class _InnerView:
    """The attention module as the inner backend must see it: this rank's head grouping and the inner
    backend's name in ``config._attn_implementation``. Everything else is read from the real module,
    which is never modified (it is shared with other layers and with non-SP use)."""

    def __init__(self, module: torch.nn.Module, inner: str, num_key_value_groups: int):
        self._module = module
        self.num_key_value_groups = num_key_value_groups
        self.config = _ConfigView(module.config, inner)

    def __getattr__(self, name: str):
        return getattr(self._module, name)


class _ConfigView:
    def __init__(self, config, attn_implementation: str):
        self._config = config
        self._attn_implementation = attn_implementation

    def __getattr__(self, name: str):
        return getattr(self._config, name)


class UlyssesAttention:
    """A transformers attention function: ``(module, q, k, v, attention_mask, **kwargs) -> (out, None)``.

    ``q``: ``[1, H, T/P, D]``, ``k``/``v``: ``[1, K, T/P, D]`` (RoPE already applied by the model),
    ``kwargs["position_ids"]``: ``[1, T/P]``, this rank's chunk. Returns ``[1, T/P, H, D]``.
    """

    def __init__(self, inner: str, group: dist.ProcessGroup):
        if inner != "eager" and inner not in ALL_ATTENTION_FUNCTIONS:
            raise ValueError(
                f"unknown inner attention backend {inner!r}; choose eager or one of {sorted(ALL_ATTENTION_FUNCTIONS)}."
            )
        if inner.startswith(ULYSSES_PREFIX):
            raise ValueError(f"{inner!r} is already a Ulysses attention; wrap its inner backend instead.")
        self.inner = inner
        self.group = group
        self.sp_size = dist.get_world_size(group)
        self._row: _GlobalRow | None = None

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        if attention_mask is not None:
            raise ValueError(
                "Ulysses attention builds the document mask itself from position_ids; do not pass an "
                "attention_mask (use padding-free packed rows from prolong.training.collator.PackedCollator)."
            )
        local_position_ids = kwargs.pop("position_ids", None)
        if local_position_ids is None:
            raise ValueError(
                f"{type(module).__name__} did not pass position_ids to the attention function; Ulysses "
                "attention needs them to rebuild the document mask of the whole row."
            )
        for name in VARLEN_KWARGS:  # would describe a local chunk: rebuilt for the global row
            kwargs.pop(name, None)
        num_heads, num_kv_heads = query.shape[1], key.shape[1]
        check_sequence_parallel_heads(num_heads, num_kv_heads, self.sp_size)
        row = self._global_row(local_position_ids, query)

        if num_kv_heads < self.sp_size:
            # one copy of each K/V head per rank whose query heads use it (see module docstring)
            copies = self.sp_size // num_kv_heads
            key = key.repeat_interleave(copies, dim=1)
            value = value.repeat_interleave(copies, dim=1)
        # [1, heads, T/P, D] -> [1, heads/P, T, D]
        query, key, value = (all_to_all(x, 1, 2, self.group) for x in (query, key, value))

        inner_module = _InnerView(module, self.inner, query.shape[1] // key.shape[1])
        output, _ = self._inner_function(module)(
            inner_module,
            query,
            key,
            value,
            self._layer_mask(row, kwargs.get("sliding_window"), query),
            position_ids=row.position_ids,
            **row.varlen_kwargs,
            **kwargs,
        )
        # inner backends return [1, T, H/P, D] -> [1, T/P, H, D]
        return all_to_all(output, 1, 2, self.group), None

    def _inner_function(self, module):
        if self.inner == "eager":
            # transformers keeps no shared eager function: each modeling file has its own
            return sys.modules[type(module).__module__].eager_attention_forward
        return ALL_ATTENTION_FUNCTIONS[self.inner]

    def _global_row(self, local_position_ids: torch.Tensor, query: torch.Tensor) -> _GlobalRow:
        # The model passes the same position_ids tensor to every layer (and to the recomputation of
        # checkpointed layers), so its identity marks "same forward": gather and build the mask once.
        if self._row is not None and self._row.local_position_ids is local_position_ids:
            return self._row
        chunks = [torch.empty_like(local_position_ids) for _ in range(self.sp_size)]
        dist.all_gather(chunks, local_position_ids.contiguous(), group=self.group)
        position_ids = torch.cat(chunks, dim=-1)
        self._row = _GlobalRow(local_position_ids, position_ids, *self._mask_for(position_ids, query))
        return self._row

    def _mask_for(self, position_ids: torch.Tensor, query: torch.Tensor) -> tuple[Any, dict[str, Any]]:
        if self._takes_varlen_arguments():
            (cu_seq_lens_q, cu_seq_lens_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(position_ids)
            varlen = dict(cu_seq_lens_q=cu_seq_lens_q, cu_seq_lens_k=cu_seq_lens_k)
            # one host sync per forward instead of one per layer
            return None, {**varlen, "max_length_q": int(max_q), "max_length_k": int(max_k)}
        return self._row_mask(create_causal_mask, position_ids, query), {}

    def _takes_varlen_arguments(self) -> bool:
        return self.inner.startswith("flash_attention") or self.inner == VARLEN

    def _layer_mask(self, row: _GlobalRow, sliding_window: int | None, query: torch.Tensor) -> Any:
        """The row's mask for a layer: causal per document, within ``sliding_window`` if it has one."""
        if not sliding_window or self._takes_varlen_arguments():  # flash / varlen take the window as a kwarg
            return row.attention_mask
        if sliding_window not in row.window_masks:
            row.window_masks[sliding_window] = self._row_mask(
                create_sliding_window_causal_mask, row.position_ids, query, sliding_window=sliding_window)
        return row.window_masks[sliding_window]

    def _row_mask(self, build, position_ids: torch.Tensor, query: torch.Tensor, **config_fields) -> Any:
        if self.inner not in ALL_MASK_ATTENTION_FUNCTIONS:
            return None
        # transformers' own mask builder, for the inner backend and the whole row's shape and positions
        return build(
            config=SimpleNamespace(_attn_implementation=self.inner, **config_fields),
            inputs_embeds=query.new_empty((position_ids.shape[0], position_ids.shape[-1], 0)),
            attention_mask=None,
            cache=None,
            position_ids=position_ids,
        )


def register_ulysses_attention(inner: str, group: dist.ProcessGroup) -> str:
    """Registers ``ulysses_<inner>`` for this SP group with transformers and returns the name."""
    name = ULYSSES_PREFIX + inner
    AttentionInterface.register(name, UlyssesAttention(inner, group))
    return name


def enable_sequence_parallel(model: PreTrainedModel, group: dist.ProcessGroup | None, inner: str | None = None) -> str:
    """Switches ``model`` to Ulysses attention over ``group`` (no-op for a group of one).

    ``inner`` is the backend that runs on the gathered sequence; by default the model's current
    ``attn_implementation`` (sdpa, flex_attention, flash_attention_2/3, eager). Returns the name of
    the attention implementation now in use.
    """
    current = model.config._attn_implementation
    if group is None or dist.get_world_size(group) == 1:
        return current
    inner = inner or current.removeprefix(ULYSSES_PREFIX)
    check_model_for_sequence_parallel(model.config, dist.get_world_size(group))
    choose_attn_implementation(inner, model.config)  # refuses a backend that ignores a window or a soft-cap
    name = register_ulysses_attention(inner, group)
    model.set_attn_implementation(name)
    return name
