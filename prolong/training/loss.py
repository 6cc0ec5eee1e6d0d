"""Causal-LM cross-entropy summed over valid tokens, computed in chunks.

The full ``tokens x vocab`` logits tensor of a 64K-token row of a 128K-vocabulary model is 32 GiB
in fp32; computing the logits chunk by chunk (and recomputing them in backward through
activation checkpointing) keeps only one chunk alive. Pure PyTorch, so it runs everywhere; it is
the fallback. On CUDA a fused linear cross-entropy runs by default (``loss_kernel: auto``): Liger's
kernel if liger-kernel is installed, else TRL's chunked log-prob kernel (always installed with TRL).
No function here reads a device value on the host: a host sync per chunk would stall the GPU
queue 16 times per 64K-token micro-step. Liger's kernel (the CUDA default when liger-kernel is
installed) does read one: its valid-token count (``.item()``), once per call, so once per
micro-step; TRL's never does. Which of the two is faster is for the GPU benchmark to say
(``bench_train.py --loss liger`` vs ``--loss trl``).

The function returns a SUM; the trainer divides by the number of valid tokens of the whole
optimizer step (all accumulation micro-steps, all devices), which makes the loss an exact
global token mean rather than a mean of per-device means.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from prolong.training.collator import IGNORE_INDEX


class HiddenStateCapture:
    """Forward hook that keeps the decoder's final hidden states (post final norm): what the loss
    reads instead of the model's logits (the trainer, and the output-head check of the probe)."""

    def __init__(self, decoder: torch.nn.Module):
        self.hidden = None
        self.handle = decoder.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state


def logit_scale_of(config) -> float | None:
    """The factor some models apply to their logits after the lm_head: Granite divides by
    ``logits_scaling``, Cohere multiplies by ``logit_scale``. None when there is none."""
    text = config.get_text_config()
    if getattr(text, "logits_scaling", None) not in (None, 1, 1.0):
        return 1.0 / text.logits_scaling
    if getattr(text, "logit_scale", None) not in (None, 1, 1.0):
        return float(text.logit_scale)
    return None


def logit_softcap_of(config) -> float | None:
    """Gemma-style soft-capping of the final logits (``final_logit_softcapping``), or None."""
    return getattr(config.get_text_config(), "final_logit_softcapping", None)


def output_logits(hidden, weight, bias=None, scale: float | None = None, softcap: float | None = None):
    """What the model's head computes from its final hidden states: lm_head (with its bias, if
    any), the model's logit scale, then Gemma-style soft-capping; in fp32."""
    logits = F.linear(hidden, weight, bias).float()
    if scale:
        logits = logits * scale
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def _chunk_loss_sum(hidden, weight, bias, labels, scale, softcap):
    logits = output_logits(hidden, weight, bias, scale, softcap)
    # reduction="sum" over ignore_index tokens gives 0 (never NaN) for a chunk with no valid label
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy_sum(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    shift_labels: torch.Tensor,
    chunk_size: int = 4096,
    logit_softcap: float | None = None,
    lm_head_bias: torch.Tensor | None = None,
    logit_scale: float | None = None,
) -> torch.Tensor:
    """Sum of token cross-entropies; ``shift_labels[t]`` is the target of ``hidden_states[t]``."""
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    labels = shift_labels.reshape(-1).to(hidden.device, non_blocking=True)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        # every chunk is computed, also one without targets (its sum is 0): skipping it would need
        # its labels on the host, one device sync per chunk
        chunk_labels = labels[start : start + chunk_size]
        chunk_hidden = hidden[start : start + chunk_size]
        if torch.is_grad_enabled() and chunk_hidden.requires_grad:
            # recompute the chunk's logits in backward instead of keeping them
            total = total + checkpoint(
                _chunk_loss_sum, chunk_hidden, lm_head_weight, lm_head_bias, chunk_labels, logit_scale,
                logit_softcap, use_reentrant=False,
            )
        else:
            total = total + _chunk_loss_sum(
                chunk_hidden, lm_head_weight, lm_head_bias, chunk_labels, logit_scale, logit_softcap
            )
    return total


def trl_linear_cross_entropy_sum(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    shift_labels: torch.Tensor,
    logit_softcap: float | None = None,
    lm_head_bias: torch.Tensor | None = None,
    logit_scale: float | None = None,
) -> torch.Tensor:
    """The same sum through TRL's fused kernel (``trl.kernels.ChunkedLogProbFunction``: cuBLAS tiles of
    the vocabulary folded into an online log-sum-exp, Triton on CUDA, torch ops elsewhere; the
    backward recomputes the tiles). Every position is scored and the ignored ones zeroed, rather
    than selecting the valid ones first, which would be a host sync (boolean indexing)."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    labels = shift_labels.reshape(-1).to(hidden.device, non_blocking=True)
    valid = labels != IGNORE_INDEX
    log_probs = ChunkedLogProbFunction.apply(
        hidden, lm_head_weight, lm_head_bias, labels.clamp(min=0), 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE,
        logit_softcap, 1.0 if logit_scale is None else logit_scale, (),
    )[0]
    return -(log_probs.float() * valid).sum()


def liger_linear_cross_entropy_sum(softcap: float | None = None):
    """Liger's fused linear cross-entropy (CUDA, Triton), called as ``loss(lm_head_weight, hidden,
    labels, bias)``. ``accum_dtype`` fp32: a 64K row's lm_head gradient is summed over many chunks,
    which in bf16 loses the small ones."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # CUDA only (Triton kernels)

    from prolong.training.compat import check_liger_fused_loss

    check_liger_fused_loss(LigerFusedLinearCrossEntropyLoss)
    return LigerFusedLinearCrossEntropyLoss(reduction="sum", softcap=softcap, accum_dtype=torch.float32)
