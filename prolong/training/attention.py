"""Attention backends for packed batches, and the start-up guard that documents stay apart.

Every backend here reads document boundaries from ``position_ids`` restarts (see
``prolong/training/collator.py``). ``auto`` picks, in order: flash_attention_2 (usable flash-attn, CUDA),
``varlen`` (PyTorch's own varlen flash kernel, CUDA, torch >= 2.10), flex_attention (sparse block
mask, any device); on CPU sdpa (dense block-diagonal mask: memory grows as L^2, fine for short rows).
It skips a backend that would ignore the model's sliding window or attention soft-capping (eager on CPU).
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from transformers import AttentionInterface
from transformers.integrations.flash_attention import get_target_dtype
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from prolong.errors import ExpectedError, RecipeError
from prolong.training.collator import NOT_MODEL_INPUTS, PackedCollator
from prolong.training.compat import check_flash_attention_kwargs, varlen_causal_call, varlen_takes_window
from prolong.training.loss import HiddenStateCapture, logit_scale_of, logit_softcap_of, output_logits

logger = logging.getLogger(__name__)

VARLEN = "varlen"


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function over torch.nn.attention.varlen (no flash-attn package needed).

    Written here because transformers ships no binding for PyTorch's varlen kernel. Training only:
    needs batch 1 (our collator always flattens), causal attention, no padding mask, no KV cache.
    """
    from torch.nn.attention.varlen import varlen_attn

    if kwargs.get("use_cache") or query.shape[2] != key.shape[2]:
        # the kernel would take the queries' boundaries for the cached keys' too
        raise RecipeError(
            "attn_implementation: varlen is a training backend and cannot attend over a KV cache (generation): "
            "pass use_cache=False, or generate with sdpa or flash_attention_2 (model.set_attn_implementation('sdpa')).")
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    unsupported = [name for name, used in (("attention logit soft-capping", kwargs.get("softcap") is not None),
                                           ("attention sinks", kwargs.get("s_aux") is not None),
                                           ("attention dropout", bool(dropout)),
                                           ("bidirectional attention", not is_causal)) if used]
    if unsupported:
        raise RecipeError(f"attn_implementation: varlen does not support {', '.join(unsupported)} "
                          f"({type(module).__name__}); use attn_implementation: auto, flash_attention_2, "
                          "flex_attention or eager.")
    position_ids = kwargs.get("position_ids")
    if position_ids is None or query.shape[0] != 1:
        raise ValueError("varlen attention needs one flat packed row with position_ids (use PackedCollator).")
    if kwargs.get("cu_seq_lens_q") is not None and kwargs.get("max_length_q") is not None:
        cu, max_len = kwargs["cu_seq_lens_q"].to(torch.int32), int(kwargs["max_length_q"])  # from the collator
    else:
        # documents restart at the row's smallest position (0 in PackedCollator rows); a host sync, per layer
        (cu, _), (max_len, _) = prepare_fa_kwargs_from_position_ids(position_ids)
        max_len = int(max_len)
    # [1, heads, T, dim] -> [T, heads, dim]
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    # as transformers' flash path: fp32 q (fp32 weights under autocast, fp32 norms) goes to the compute dtype
    target_dtype = get_target_dtype(q, module) if module is not None else None
    if target_dtype is not None:
        q, k, v = (t.to(target_dtype) for t in (q, k, v))
    # the causal / window / scale / GQA arguments differ between torch 2.10 and 2.11+ (prolong.training.compat)
    call_kwargs, repeat_kv = varlen_causal_call(varlen_attn, scaling, q.shape[-1], q.shape[1], k.shape[1],
                                                sliding_window=kwargs.get("sliding_window"))
    if repeat_kv:
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    out = varlen_attn(q, k, v, cu, cu, max_len, max_len, **call_kwargs)
    return out[None], None  # transformers expects [batch, T, heads, dim]


AttentionInterface.register(VARLEN, varlen_attention_forward)

SLIDING_WINDOW, SOFTCAP = "sliding_window", "attn_logit_softcapping"


def attention_features(config) -> dict[str, float]:
    """The config fields of features an attention backend may silently ignore, with their values."""
    if config is None:
        return {}
    text = config.get_text_config()
    return {name: getattr(text, name) for name in (SLIDING_WINDOW, SOFTCAP) if getattr(text, name, None)}


def flash_attention_2_problem() -> str | None:
    """Why flash_attention_2 cannot run here, by transformers' own check plus an import (a wheel
    built for another torch or CUDA passes the metadata check and fails to load); None if it can."""
    import transformers.utils

    if not transformers.utils.is_flash_attn_2_available():
        return "transformers finds no flash-attn 2 it can use (needs a CUDA GPU and the flash-attn>=2.3.3 package)"
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except Exception as error:  # noqa: BLE001 - an ABI mismatch raises ImportError or OSError
        return f"flash-attn is installed but does not load ({type(error).__name__}: {error})"
    return None


def _backend_problem(name: str, features: dict) -> str | None:
    """Why backend ``name`` cannot run this model here, or would ignore one of its ``features``."""
    if name == "flash_attention_2":
        problem = flash_attention_2_problem()
        if problem is None:  # it would run: the collator's boundaries must reach it (raises if they cannot)
            check_flash_attention_kwargs()
        return problem
    ignored = []
    if name == VARLEN:
        if importlib.util.find_spec("torch.nn.attention.varlen") is None:
            return f"torch {torch.__version__} has no torch.nn.attention.varlen (torch >= 2.10)"
        from torch.nn.attention.varlen import varlen_attn

        ignored = [f for f in features if f == SOFTCAP or not varlen_takes_window(varlen_attn)]
    elif name == "sdpa":
        ignored = [f for f in features if f == SOFTCAP]
    if ignored:
        return f"it ignores this model's {', '.join(f'{f}={features[f]}' for f in ignored)}"
    return None


def choose_attn_implementation(requested: str, config=None) -> str:
    """The backend for ``requested`` (``auto`` or a name) and the model's ``config``; refuses, before
    the model loads, a backend that cannot run here or would ignore the model's attention features."""
    features = attention_features(config)
    if requested != "auto":
        problem = _backend_problem(requested, features)
        if problem:
            flash = requested == "flash_attention_2"
            fix = "install a flash-attn wheel built for this torch and CUDA, or " if flash else ""
            raise RecipeError(f"attn_implementation: {requested} cannot train this model here: {problem}. Fix: {fix}"
                              f"use attn_implementation: auto (picks {choose_attn_implementation('auto', config)} "
                              "here).")
        return requested
    # On CPU, flex_attention has no backward in torch 2.13 ("FlexAttention does not support
    # backward on CPU"); sdpa's dense block-diagonal mask is exact at the lengths a CPU can train.
    # eager and flex_attention run the model's own score modifications: they honour every feature.
    order = ("flash_attention_2", VARLEN, "flex_attention") if torch.cuda.is_available() else ("sdpa", "eager")
    chosen = next((name for name in order[:-1] if _backend_problem(name, features) is None), order[-1])
    if features:
        logger.info("attn_implementation auto: %s (the model sets %s)", chosen, features)
    return chosen


DENSE_MASK_BACKENDS = ("sdpa", "eager")


def dense_mask_warning(attn: str, max_length: int | None) -> str | None:
    """sdpa and eager mask packed rows with a dense T x T block-diagonal mask: exact, but its size
    (T^2 bytes for sdpa's boolean mask, more for eager's scores) makes long rows impractical."""
    if attn not in DENSE_MASK_BACKENDS or not max_length or max_length < 16384:
        return None
    gib = max_length**2 / 2**30
    return (
        f"attn_implementation={attn} builds a dense {max_length} x {max_length} document mask per packed row "
        f"(>= {gib:.0f} GiB at max_length {max_length}): correct but slow and memory-bound. On a GPU use "
        "attn_implementation: auto (flash_attention_2 or varlen) or flex_attention."
    )


class DocumentMaskingError(ExpectedError):
    """The model lets packed documents see each other; the message names the backend to use."""


class OutputHeadError(ExpectedError):
    """The output head does not compute what the recipe's loss assumes."""


def _check_output_head(model, hidden: torch.Tensor, logits: torch.Tensor) -> None:
    """The training loss never builds the model's logits: it applies the output head to the
    decoder's hidden states itself (prolong.training.loss.output_logits). Refuse a model whose head does
    something else (an unknown logit transform), which would train a different objective."""
    head = model.get_output_embeddings()
    ours = output_logits(hidden, head.weight, head.bias, logit_scale_of(model.config), logit_softcap_of(model.config))
    delta = (ours - logits).abs().max().item()
    if not delta <= 1e-2 * (logits.abs().max().item() + 1e-6):
        raise OutputHeadError(
            f"{type(model).__name__} computes its logits differently from lm_head(hidden states) with its bias, "
            f"logit scale and soft-capping (max difference {delta:.3g}): the chunked loss would train another "
            "objective. This model's output head is not supported."
        )


def guard_document_masking(model, args, collator=None, train_dataset=None, packed: bool = True) -> None:
    """Run ``check_document_masking`` once, on the main process, on its training device, with the
    trainer's own collator (``collator``) on a row in its own dataset's format (``train_dataset[0]``).

    The model is still on CPU here (the Trainer places it later) while flash/varlen kernels need
    CUDA, and with FSDP's RAM-efficient loading only the main process holds real weights.
    The other processes wait for the verdict.
    """
    if not args.check_document_masking:
        return
    with args.main_process_first(local=False, desc="document-masking probe"):
        if args.process_index == 0:
            try:  # a map-style dataset; an iterable one gives no sample and the probe keeps our layout
                sample = train_dataset[0] if train_dataset is not None else None
            except (TypeError, IndexError, KeyError, NotImplementedError):
                sample = None
            check_document_masking(model, device=args.device, collator=collator, sample=sample, packed=packed)


@torch.no_grad()
def check_document_masking(model, doc_len: int = 48, seed: int = 0, device=None, collator=None,
                           sample: dict | None = None, packed: bool = True) -> float:
    """Refuse to train if packed documents can see each other with this model, backend and collator.

    Packs two documents A and B in one row exactly as training does (``collator``, default
    PackedCollator, on a row laid out like the training rows ``sample``), replaces every token of A,
    and checks that B's logits do not move. Returns the largest change seen (0 when masked).
    With ``device``, the model is moved there for the probe and back afterwards.
    """
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    if device != home:
        model.to(device)
    try:
        return _probe(model, doc_len, seed, device, collator or PackedCollator(), sample, packed)
    finally:
        if device != home:
            model.to(home)


# collator outputs that are targets or bookkeeping, not model inputs (ours and TRL's)
_NOT_FORWARD_INPUTS = (*NOT_MODEL_INPUTS, "completion_mask", "assistant_masks")


def probe_examples(doc_a: list[int], doc_b: list[int], sample: dict | None, packed: bool = True) -> list[dict]:
    """Documents A and B laid out as the training dataset lays out its rows (``sample``): spans in
    ``indices`` (prolong-data / CPT), ``seq_lengths`` (TRL's bfd packing and pre-packed SFT rows),
    one row without boundaries (packing that keeps none), or one document per example (no packing).
    Other per-token columns (masks) are all ones, ``labels`` the tokens, scalars copied."""
    n = len(doc_a)
    keys = set(sample or ("input_ids", "indices"))
    if "indices" in keys:
        rows = [{"input_ids": doc_a + doc_b, "indices": [[0, n], [n, 2 * n]]}]
    elif "seq_lengths" in keys:
        rows = [{"input_ids": doc_a + doc_b, "seq_lengths": [n, n]}]
    elif packed:
        rows = [{"input_ids": doc_a + doc_b}]
    else:
        rows = [{"input_ids": doc_a}, {"input_ids": doc_b}]
    for row in rows:
        for key, value in (sample or {}).items():
            if key in row:
                continue
            if key == "labels":
                row[key] = list(row["input_ids"])
            elif hasattr(value, "__len__") and not isinstance(value, str) and len(value) == len(sample["input_ids"]):
                row[key] = [1] * len(row["input_ids"])
            elif isinstance(value, (str, int, float)):
                row[key] = value
    return rows


def _probe(model, doc_len: int, seed: int, device: torch.device, collator, sample, packed) -> float:
    was_training = model.training
    model.eval()
    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(seed)
    doc_a, doc_b, doc_a2 = (torch.randint(3, vocab, (doc_len,), generator=gen).tolist() for _ in range(3))

    capture = HiddenStateCapture(model.get_decoder())  # where the training loss reads its hidden states

    def hidden_and_logits(first_doc):
        batch = collator(probe_examples(first_doc, doc_b, sample, packed))
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items() if k not in _NOT_FORWARD_INPUTS}
        logits = model(**inputs, use_cache=False).logits.float()
        return capture.hidden, logits

    def of_b(logits):  # B: tokens doc_len..2*doc_len of a flat packed row, or the second example of a batch
        return logits[0, doc_len : 2 * doc_len] if logits.shape[0] == 1 else logits[1, :doc_len]

    try:
        hidden, logits = hidden_and_logits(doc_a)
        _check_output_head(model, hidden.reshape(-1, hidden.shape[-1]), logits.reshape(-1, logits.shape[-1]))
        reference, changed = of_b(logits), of_b(hidden_and_logits(doc_a2)[1])
    finally:
        capture.handle.remove()
        model.train(was_training)
    delta = (reference - changed).abs().max().item()
    scale = reference.abs().max().item() + 1e-6
    if not delta <= 1e-3 * scale:  # `not <=` also catches NaN
        raise DocumentMaskingError(
            f"Packed documents attend to each other with attn_implementation="
            f"'{model.config._attn_implementation}' and the training collator ({type(collator).__name__}): "
            f"changing document A moved document B's logits by "
            f"{delta:.3g}. Use attn_implementation: auto, flash_attention_2, varlen, flex_attention or sdpa, "
            "and pass no attention_mask with packed batches."
        )
    return delta


def log_probe_passed(model, args) -> None:
    """guard_document_masking raises when documents see each other; reaching here means it passed."""
    if args.check_document_masking and args.process_index == 0:
        logger.info("Document-masking probe passed with attn_implementation=%s: packed documents do not see "
                    "each other.", model.config._attn_implementation)
