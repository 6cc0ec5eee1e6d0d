"""CPU activation offload: an optional memory knob for the longest sequences.

``torch.autograd.graph.save_on_cpu`` moves every tensor autograd saves for backward to (pinned)
CPU memory during the forward and brings it back during backward. Combined with activation
checkpointing, what is saved is mostly the input of each checkpointed decoder layer
(T x hidden per layer), so the GPU keeps only one layer's activations at a time at the cost of
PCIe traffic (a few percent to ~20% slower, an estimate: measure it on your GPUs).
"""

from __future__ import annotations

import contextlib

import torch


def activation_offload(enabled: bool, pin_memory: bool = True):
    """Context manager around the forward of a training step (backward may run outside it);
    a no-op when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=pin_memory and torch.cuda.is_available())
