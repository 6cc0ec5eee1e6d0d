"""Attention backends for packed batches, and the start-up guard that documents stay apart.

Every backend here reads document boundaries from ``position_ids`` restarts (see
``prolong/training/collator.py``). ``auto`` picks, in order: flash_attention_2 (flash-attn installed, CUDA),
``varlen`` (PyTorch's own varlen flash kernel, CUDA, torch >= 2.10), flex_attention (sparse block
mask, any device), sdpa (dense block-diagonal mask: memory grows as L^2, fine for short rows).
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from transformers import AttentionInterface
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from prolong.training.collator import NOT_MODEL_INPUTS, PackedCollator
from prolong.training.loss import logit_scale_of, logit_softcap_of, output_logits

logger = logging.getLogger(__name__)

VARLEN = "varlen"


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function over torch.nn.attention.varlen (no flash-attn package needed).

    Written here because transformers ships no binding for PyTorch's varlen kernel. Needs batch 1
    (our collator always flattens), causal attention, no padding mask.
    """
    from torch.nn.attention.varlen import varlen_attn

    from prolong.parallel.compat import varlen_causal_call  # here: prolong.parallel imports this module

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
    # the causal / scale / GQA arguments differ between torch 2.10 and 2.11+ (prolong.parallel.compat)
    call_kwargs, repeat_kv = varlen_causal_call(varlen_attn, scaling, q.shape[-1], q.shape[1], k.shape[1])
    if repeat_kv:
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    out = varlen_attn(q, k, v, cu, cu, max_len, max_len, **call_kwargs)
    return out[None], None  # transformers expects [batch, T, heads, dim]


AttentionInterface.register(VARLEN, varlen_attention_forward)


def choose_attn_implementation(requested: str) -> str:
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
        if importlib.util.find_spec("torch.nn.attention.varlen") is not None:
            return VARLEN
        return "flex_attention"
    # On CPU, flex_attention has no backward in torch 2.13 ("FlexAttention does not support
    # backward on CPU"); sdpa's dense block-diagonal mask is exact at the lengths a CPU can train.
    return "sdpa"


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


class DocumentMaskingError(RuntimeError):
    pass


class OutputHeadError(RuntimeError):
    pass


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

    captured = {}

    def keep_hidden(module, args, out):  # where the training loss reads its hidden states
        captured["hidden"] = out[0] if isinstance(out, tuple) else out.last_hidden_state

    hook = model.get_decoder().register_forward_hook(keep_hidden)

    def logits_of_b(first_doc):
        batch = collator(probe_examples(first_doc, doc_b, sample, packed))
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items() if k not in _NOT_FORWARD_INPUTS}
        logits = model(**inputs, use_cache=False).logits.float()
        hidden = captured["hidden"]
        captured["flat"] = hidden.reshape(-1, hidden.shape[-1]), logits.reshape(-1, logits.shape[-1])
        # B: tokens doc_len..2*doc_len of a flat packed row, or the second example of a batch
        return logits[0, doc_len : 2 * doc_len] if logits.shape[0] == 1 else logits[1, :doc_len]

    try:
        reference = logits_of_b(doc_a)
        _check_output_head(model, *captured["flat"])
        changed = logits_of_b(doc_a2)
    finally:
        hook.remove()
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
