"""Opt-in ``torch.compile`` of the decoder layers (``compile_decoder_layers: inductor``).

Why not the Trainer's ``torch_compile``: it compiles the whole model, so packed rows of a new
length or a new document layout recompile the graph (and the chunked loss / varlen boundaries
sit outside it). Here ONE compiled function runs every decoder layer: the layer is an argument,
so (with dynamo's default ``inline_inbuilt_nn_modules``) its weights are graph inputs and every
layer of the same class reuses one graph instead of hitting the recompile limit after 8 layers;
``dynamic=True`` keeps the sequence length symbolic, so new lengths do not recompile either.
transformers 5.24 checkpoints a layer by wrapping its class's ``forward``, so with activation
checkpointing on, the checkpoint is traced inside the compiled function (dynamo's supported
checkpoint path); tests/test_memory_options.py runs that combination.
"""

from __future__ import annotations

import types

import torch


def _layer_forward(layer, *args, **kwargs):
    return type(layer).forward(layer, *args, **kwargs)  # the class's code: one graph for all layers


def _compiled_forward(layer, *args, **kwargs):
    return layer.compiled_layer_forward(layer, *args, **kwargs)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise ValueError(
            f"compile_decoder_layers: {type(model).__name__}'s decoder has no `layers` list; "
            "unset compile_decoder_layers for this model."
        )
    return list(layers)


def compile_decoder_layers(model: torch.nn.Module, backend: str = "inductor") -> int:
    """Route every decoder layer's forward through one ``torch.compile(dynamic=True)`` function.
    Idempotent; returns the number of layers."""
    layers = decoder_layers(model)
    compiled = torch.compile(_layer_forward, backend=backend, dynamic=True)
    for layer in layers:
        if getattr(layer, "compiled_layer_forward", None) is None:
            layer.compiled_layer_forward = compiled
            # a bound method, not a closure: a deepcopy of the model binds it to the copy's layer
            layer.forward = types.MethodType(_compiled_forward, layer)
    return len(layers)
