"""GPU-only library calls, checked against the installed versions' signatures.

These calls only run on CUDA, so a CPU CI never executes them and an API change between the
versions we support would first show as a TypeError on a GPU, hours into a job queue. Each
function here reads the installed signature (``inspect``), adapts the call where supported
versions differ (a shim) and otherwise raises one clear error naming the versions. A run calls
each where its feature is in use: ``varlen_causal_call`` (every varlen forward),
``check_liger_fused_loss`` (when it builds Liger's loss), ``check_flash_attention_kwargs`` (when it
picks flash_attention_2) and ``check_save_on_cpu`` (CPTTrainer, with ``activation_offload``).
``tests/test_signatures.py`` runs every check here against the installed libraries, and checks
the FSDP2 accelerate configs and the hand-off's ``load_fsdp_optimizer`` call.

Supported (setup.cfg): torch 2.10-2.13 (``varlen_attn`` exists from 2.10), transformers 5.24+,
accelerate 1.14+, liger-kernel 0.6.2+ (optional), flash-attn 2.7+ through transformers (optional).
"""

from __future__ import annotations

import functools
import inspect
import math


class IncompatibleLibraryError(RuntimeError):
    """An installed library's API is not the one this code calls; the message names the fix."""


def _parameters(fn) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(fn).parameters)


@functools.lru_cache(maxsize=None)
def _varlen_parameters(varlen_attn) -> frozenset[str]:
    return frozenset(_parameters(varlen_attn))


def varlen_takes_window(varlen_attn) -> bool:
    """Whether the installed ``varlen_attn`` can attend over a sliding window (torch 2.11+)."""
    return "window_size" in _varlen_parameters(varlen_attn)


def varlen_causal_call(varlen_attn, scale: float | None, head_dim: int, num_heads: int, num_kv_heads: int,
                       sliding_window: int | None = None):
    """Keyword arguments of a causal ``torch.nn.attention.varlen.varlen_attn`` call for the installed
    torch, and whether the caller must repeat the K/V heads itself (no ``enable_gqa``).

    torch 2.10: ``varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None)``
    (no ``scale``: always 1/sqrt(head_dim); no GQA; no window). torch 2.11+: keyword-only ``scale`` and
    ``window_size`` ((-1, 0) = causal, (W, 0) = causal over the W keys before each query) replace
    ``is_causal``; 2.13 adds ``enable_gqa``. ``sliding_window`` is transformers' (the query counts).
    """
    params = _varlen_parameters(varlen_attn)
    kwargs: dict = {}
    if varlen_takes_window(varlen_attn):
        # transformers' window W holds the query and the W - 1 keys before it (its flash path passes W - 1 too)
        kwargs["window_size"] = (sliding_window - 1, 0) if sliding_window else (-1, 0)
    elif "is_causal" in params:
        if sliding_window:
            raise IncompatibleLibraryError(
                f"torch {_version('torch')}: varlen_attn has no window_size and this model attends over a sliding "
                f"window of {sliding_window}; use torch >= 2.11 or attn_implementation: flash_attention_2 / "
                "flex_attention."
            )
        kwargs["is_causal"] = True
    else:
        raise IncompatibleLibraryError(
            f"torch {_version('torch')}: varlen_attn takes neither window_size nor is_causal "
            f"({sorted(params)}); use torch 2.10-2.13 or attn_implementation: flash_attention_2 / flex_attention."
        )
    if scale is not None:
        if "scale" in params:
            kwargs["scale"] = scale
        elif not math.isclose(scale, head_dim**-0.5, rel_tol=1e-6):
            raise IncompatibleLibraryError(
                f"torch {_version('torch')}: varlen_attn has no `scale` argument and this model scales its "
                f"attention by {scale:g}, not 1/sqrt({head_dim}); use torch >= 2.11 or attn_implementation: "
                "flash_attention_2 / flex_attention."
            )
    repeat_kv = False
    if num_kv_heads != num_heads:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            repeat_kv = True  # older torch: the K/V heads are repeated to the query heads (more memory)
    return kwargs, repeat_kv


def check_liger_fused_loss(loss_class) -> None:
    """``LigerFusedLinearCrossEntropyLoss(reduction=, softcap=, accum_dtype=)`` called as
    ``loss(lm_head_weight, hidden, labels, bias)``: the form of liger-kernel 0.6.2+ (``accum_dtype``
    sums the bf16 lm_head gradient over a 64K row's chunks in fp32)."""
    init = _parameters(loss_class.__init__)
    forward = [name for name in _parameters(loss_class.forward) if name != "self"]
    missing = [name for name in ("reduction", "softcap", "accum_dtype") if name not in init]
    if missing or forward[:4] != ["lin_weight", "_input", "target", "bias"]:
        raise IncompatibleLibraryError(
            f"liger-kernel {_version('liger-kernel')}: LigerFusedLinearCrossEntropyLoss lacks {missing or ''} "
            f"or takes ({', '.join(forward)}) instead of (lin_weight, _input, target, bias); install "
            "liger-kernel>=0.6.2 or set loss_kernel: trl."
        )


FLASH_VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids")


def check_flash_attention_kwargs() -> None:
    """The collator's varlen boundaries reach flash-attn through transformers'
    ``_flash_attention_forward`` under these names (transformers 5.x)."""
    from transformers.modeling_flash_attention_utils import _flash_attention_forward

    missing = [name for name in FLASH_VARLEN_KWARGS if name not in _parameters(_flash_attention_forward)]
    if missing:
        raise IncompatibleLibraryError(
            f"transformers {_version('transformers')}: _flash_attention_forward takes no {missing}; packed rows "
            "would attend across documents. Use transformers>=5.24,<6 or attn_implementation: varlen."
        )


def check_save_on_cpu() -> None:
    """``activation_offload`` calls ``torch.autograd.graph.save_on_cpu(pin_memory=...)``."""
    import torch

    if "pin_memory" not in _parameters(torch.autograd.graph.save_on_cpu):
        raise IncompatibleLibraryError(
            f"torch {_version('torch')}: torch.autograd.graph.save_on_cpu takes no pin_memory; set activation_offload: false."
        )


def _version(distribution: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"
