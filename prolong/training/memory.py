"""CPU activation offload: an optional memory knob for the longest sequences.

``torch.autograd.graph.save_on_cpu`` moves every tensor autograd saves for backward to (pinned)
CPU memory during the forward and brings it back during backward. Combined with activation
checkpointing, what is saved is mostly the input of each checkpointed decoder layer
(T x hidden per layer), so the GPU keeps only one layer's activations at a time at the cost of
PCIe traffic (a few percent to ~20% slower, an estimate: measure it on your GPUs).
"""

from __future__ import annotations

import contextlib
import types

import torch


def activation_offload(enabled: bool, pin_memory: bool = True):
    """Context manager around the forward of a training step (backward may run outside it);
    a no-op when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=pin_memory and torch.cuda.is_available())


# --- Tiled MLP -------------------------------------------------------------------------------
# At 512K tokens the MLP's intermediate activations dominate a layer's memory: for a 1B Llama
# shape (intermediate 8192) each of gate, up and act(gate)*up is 512K x 8192 bf16 = 8 GiB, even
# with activation checkpointing (the recomputed layer holds them during its backward). Running
# the MLP on sequence tiles and recomputing each tile in the backward (ALST's TiledMLP) keeps one
# tile's intermediates alive instead. Written here because the maintained versions are tied to a
# runtime we cannot require: DeepSpeed's to DeepSpeed, Liger's to Triton/CUDA, and both hand
# parameter gradients to DDP/FSDP through framework-specific hooks. This one returns the
# parameter gradients through autograd like any op, so DDP, FSDP2 and checkpointing see nothing
# special, and it runs (and is tested) on CPU.


class _TiledMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mlp_forward, tile_tokens: int, x: torch.Tensor, *params: torch.Tensor):
        ctx.mlp_forward, ctx.tile_tokens = mlp_forward, tile_tokens
        device = x.device.type
        ctx.autocast = {  # the backward's recomputation must run under the forward's autocast
            "device_type": device,
            "dtype": torch.get_autocast_dtype(device),
            "enabled": torch.is_autocast_enabled(device),
        }
        ctx.save_for_backward(x, *params)
        with torch.no_grad():
            tiles = [mlp_forward(tile) for tile in x.split(tile_tokens, dim=-2)]
        if not all(isinstance(tile, torch.Tensor) for tile in tiles):
            raise TypeError("tiled_mlp_tokens needs an MLP that returns one tensor (dense MLPs, not MoE).")
        return torch.cat(tiles, dim=-2)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        x, *params = ctx.saved_tensors
        trainable = [p for p in params if p.requires_grad]
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[2] else None
        grad_params = [None] * len(trainable)
        start = 0
        # one autocast region for all tiles: the weights' low-precision casts are made once
        with torch.enable_grad(), torch.autocast(**ctx.autocast):
            for tile, grad_tile in zip(x.split(ctx.tile_tokens, dim=-2), grad_output.split(ctx.tile_tokens, dim=-2)):
                tile = tile.detach().requires_grad_(grad_x is not None)
                out = ctx.mlp_forward(tile)
                inputs = ([tile] if grad_x is not None else []) + trainable
                grads = list(torch.autograd.grad(out, inputs, grad_tile, allow_unused=True))
                if grad_x is not None:
                    grad_x.narrow(-2, start, tile.shape[-2]).copy_(grads.pop(0))
                for i, grad in enumerate(grads):
                    if grad is not None:
                        grad_params[i] = grad if grad_params[i] is None else grad_params[i].add_(grad)
                start += tile.shape[-2]
        grads_by_param = iter(grad_params)
        return (None, None, grad_x, *(next(grads_by_param) if p.requires_grad else None for p in params))


def _tiled_forward(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if x.shape[-2] <= mlp.tiled_mlp_tokens or not torch.is_grad_enabled():
        return mlp.untiled_forward(x)
    params = list(mlp.parameters())  # looked up per call: FSDP2 swaps in the unsharded ones
    return _TiledMLPFunction.apply(mlp.untiled_forward, mlp.tiled_mlp_tokens, x, *params)


def enable_tiled_mlp(model: torch.nn.Module, tile_tokens: int) -> int:
    """Run every decoder layer's `mlp` on sequence tiles (dim -2) of at most `tile_tokens` tokens,
    each recomputed in the backward. Exact, since the MLP is position-wise. Returns the number of
    MLPs changed; raises if the model keeps none where Hugging Face decoders keep them."""
    if tile_tokens < 1:
        raise ValueError(f"tiled_mlp_tokens must be a positive number of tokens, got {tile_tokens}.")
    mlps = [module.mlp for module in model.modules() if isinstance(getattr(module, "mlp", None), torch.nn.Module)]
    if not mlps:
        raise ValueError(
            f"tiled_mlp_tokens: {type(model).__name__} has no decoder layers with an `mlp` submodule; "
            "set tiled_mlp_tokens: 0 for this model."
        )
    for mlp in mlps:
        dropout = [m.p for m in mlp.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
        if dropout:  # the backward's recomputation would draw other dropout masks
            raise ValueError(
                f"tiled_mlp_tokens: {type(mlp).__name__} has dropout (p={dropout[0]}), which the tiles' "
                "recomputation would draw differently; set the model's dropout to 0 or tiled_mlp_tokens: 0."
            )
        if not hasattr(mlp, "untiled_forward"):
            # the forward in place now (the class's, or a kernel such as Liger's patched in before)
            mlp.untiled_forward = mlp.forward
        mlp.tiled_mlp_tokens = tile_tokens
        # bound methods, not closures: a deepcopy of the model binds them to the copy's MLPs
        mlp.forward = types.MethodType(_tiled_forward, mlp)
    return len(mlps)
