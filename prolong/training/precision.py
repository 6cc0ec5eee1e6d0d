"""Training precision, decided once: the optimizer steps fp32 master weights.

``bf16: true`` means bf16 *compute* (autocast, or FSDP2's ``param_dtype``) over fp32 parameters.
AdamW stepping bf16 weights directly loses most updates: bf16 keeps 8 significant bits, so an
update smaller than half a weight's spacing rounds away (at lr 1e-5: every weight above 2**-8 in
magnitude, so 85% of std-0.02 weights and every RMSNorm weight stay as they are). So a recipe
that loads bf16/fp16 weights trains only where something keeps an fp32 copy: accelerate's FSDP2
(it upcasts trainable parameters before sharding) or peft's LoRA (adapters are created in fp32).
Anything else is refused unless the recipe says ``low_precision_master_weights: true``.
"""

from __future__ import annotations

import logging
import os

import torch

from prolong.errors import RecipeError

logger = logging.getLogger(__name__)

LOW_PRECISION = (torch.bfloat16, torch.float16)
MANTISSA_BITS = {torch.bfloat16: 8, torch.float16: 11}  # significant bits, the implicit one included


def uses_fsdp2(args) -> bool:
    """FSDP2 through `accelerate launch --config_file fsdp2*.yaml` (environment) or the recipe's
    ``fsdp`` / ``fsdp_config`` fields. On CPU accelerate falls back to DDP, so CUDA is required."""
    if not torch.cuda.is_available():
        return False
    from_env = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and os.environ.get("FSDP_VERSION", "1") == "2"
    plugin = getattr(args, "fsdp_plugin_args", None) or {}
    return from_env or plugin.get("fsdp_version") == 2


def check_master_weights(dtype: torch.dtype, args, opted_in: bool, lora: bool = False) -> None:
    """Refuse, before any weights load, a recipe whose optimizer would step bf16/fp16 weights."""
    if dtype not in LOW_PRECISION or lora or uses_fsdp2(args) or opted_in:
        return
    name = str(dtype).removeprefix("torch.")
    raise RecipeError(
        f"dtype: {name} loads {name} weights and, without FSDP2, AdamW would step them with no fp32 copy: "
        "at ProLong's learning rates most updates round away (lr 1e-5: 85% of weights and every norm weight "
        f"unchanged by a step). Set dtype: auto (fp32 weights; bf16: true still computes in bf16), launch with "
        "accelerate_configs/fsdp2.yaml (fp32 master weights, bf16 compute), or set low_precision_master_weights: "
        "true to accept the loss."
    )


def rounded_away_share(parameters, learning_rate: float) -> tuple[float, int, int]:
    """For low-precision trainable ``parameters``: the share of weights a step of size
    ``learning_rate`` (AdamW's first step, about lr per weight) cannot change, and how many of the
    parameter tensors lose every update (norm weights near 1.0 do)."""
    lost = total = frozen_tensors = tensors = 0
    for param in parameters:
        if not param.requires_grad or param.dtype not in LOW_PRECISION:
            continue
        _, exponent = torch.frexp(param.detach().float())
        half_spacing = torch.ldexp(torch.ones_like(param, dtype=torch.float32), exponent - MANTISSA_BITS[param.dtype] - 1)
        unchanged = (half_spacing > learning_rate) & (param != 0)
        lost, total, tensors = lost + int(unchanged.sum()), total + param.numel(), tensors + 1
        frozen_tensors += bool(unchanged.all())
    return (lost / total if total else 0.0), frozen_tensors, tensors


def warn_low_precision_master_weights(model, args) -> None:
    """The opt-in's log: what a step at this learning rate loses on this very model."""
    share, frozen, tensors = rounded_away_share(model.parameters(), args.learning_rate)
    if tensors:
        logger.warning(
            "low_precision_master_weights: the optimizer steps %s weights with no fp32 copy. At learning_rate %g, "
            "a step cannot change %.1f%% of this model's weights, and %d of its %d weight tensors (norms) not at all.",
            str(next(p for p in model.parameters() if p.dtype in LOW_PRECISION).dtype).removeprefix("torch."),
            args.learning_rate, 100 * share, frozen, tensors,
        )


def check_trainable_dtype(model, args, opted_in: bool) -> None:
    """The same rule on the model as built (after peft): FSDP2 upcasts at prepare, nothing else does."""
    if opted_in or uses_fsdp2(args):
        if opted_in:
            warn_low_precision_master_weights(model, args)
        return
    low = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad and p.dtype in LOW_PRECISION})
    if low:
        raise RecipeError(
            f"The model's trainable parameters are {'/'.join(low)}, and the optimizer would step them with no fp32 "
            "copy (most updates round away). Load them in fp32 (dtype: auto), train under accelerate_configs/fsdp2.yaml, "
            "or set low_precision_master_weights: true to accept the loss."
        )


def reduce_gradients_in_fp32(accelerator) -> None:
    """Under FSDP2 with bf16 compute, reduce-scatter gradients in fp32 (accelerate's policy reduces
    in bf16): the token-mean loss is then exact to fp32 summation across ranks, not to bf16.
    Applied before ``prepare`` shards the model; a policy the user set explicitly is kept."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    policy = getattr(plugin, "mixed_precision_policy", None)
    if plugin is None or getattr(plugin, "fsdp_version", 1) != 2 or policy is None:
        return
    if policy.param_dtype in LOW_PRECISION and policy.reduce_dtype == policy.param_dtype:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        plugin.mixed_precision_policy = MixedPrecisionPolicy(
            param_dtype=policy.param_dtype, reduce_dtype=torch.float32, output_dtype=policy.output_dtype,
            cast_forward_inputs=policy.cast_forward_inputs,
        )
