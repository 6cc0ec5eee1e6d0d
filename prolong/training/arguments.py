"""What the training arguments (``config.CPTConfig``, ``config.SFTRecipeConfig``) need beyond their
fields: defaults that depend on the machine and value checks transformers makes late or never (run
by their shared ``__post_init__``), and the accumulation derived from ``global_batch_size`` once the
process count is known (run by both entry scripts)."""

from __future__ import annotations

import importlib.util
import logging
import os

from prolong.errors import RecipeError

logger = logging.getLogger(__name__)


def apply_machine_defaults(args) -> None:
    """Defaults that depend on the machine (before validation)."""
    import torch

    cuda = torch.cuda.is_available()
    if args.bf16 and args.fp16:  # before bf16 is switched off on a CPU
        raise RecipeError("bf16 and fp16 are both true; keep one (bf16 on GPUs that have it).")
    refuse_broken_cuda(args, cuda)
    if args.use_liger_kernel and cuda and importlib.util.find_spec("liger_kernel") is None:
        raise RecipeError(
            "use_liger_kernel: true, but liger-kernel is not installed; `pip install -e .[gpu]` (or "
            "`pip install liger-kernel`), or set use_liger_kernel: false."
        )
    if args.bf16 is None:
        args.bf16 = cuda
    elif args.bf16 and not cuda:
        # a GPU recipe run on CPU: transformers would refuse it ("doesn't support bf16/gpu")
        logger.warning("bf16 needs CUDA: turned off on this machine (the model trains in the dtype it is loaded in).")
        args.bf16 = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not cuda:
        # without this, TrainingArguments runs each torchrun process alone on CPU (no gloo group)
        args.use_cpu = True
    if args.use_liger_kernel and not cuda:
        # liger-kernel imports on CPU but fails at the first forward, and patches classes globally
        logger.warning("use_liger_kernel needs CUDA: turned off on this machine (chunked loss instead).")
        args.use_liger_kernel = False


def refuse_broken_cuda(args, cuda: bool) -> None:
    """A CUDA build of torch that cannot reach a GPU (driver, CUDA_VISIBLE_DEVICES, a container without
    the GPU) would otherwise turn bf16 and Liger off and train a GPU recipe on the CPU."""
    import torch

    asks_for_gpu = args.bf16 or args.use_liger_kernel
    if cuda or not asks_for_gpu or args.use_cpu or not torch.backends.cuda.is_built():
        return
    asked = "bf16: true" if args.bf16 else "use_liger_kernel: true"
    raise RecipeError(
        f"{asked} needs a GPU, and this torch is a CUDA build ({torch.version.cuda}) that finds none "
        "(torch.cuda.is_available() is False: check nvidia-smi, the driver and CUDA_VISIBLE_DEVICES). "
        "To run on the CPU on purpose, set use_cpu: true."
    )


def refuse_generation_under_sharding(args) -> None:
    """The recall callback generates on the main process alone; sharded weights (FSDP, ZeRO-3) are
    gathered by collectives every process must join, so the job would hang until the NCCL timeout."""
    if not getattr(args, "eval_recall_lengths", None):
        return
    fsdp = bool(args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    zero3 = _deepspeed_stage(args) == 3
    if fsdp or zero3:
        raise RecipeError(
            f"eval_recall_lengths runs generation on the main process alone, which {'FSDP' if fsdp else 'ZeRO-3'} "
            "sharding cannot do (the other processes would wait for the gather until the timeout); drop it and "
            "evaluate checkpoints with `python -m evaluation.run`."
        )


def _deepspeed_stage(args) -> int | None:
    """ZeRO stage from the recipe's ``deepspeed`` (file or mapping) or `accelerate launch`'s environment."""
    import json

    if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        return int(os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
    config = args.deepspeed or (os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
                                if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" else None)
    if isinstance(config, str) and os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            config = json.load(f)
    return (config or {}).get("zero_optimization", {}).get("stage") if isinstance(config, dict) else None


def check_scheduler_kwargs(args) -> None:
    """lr_scheduler_kwargs against the chosen scheduler's own parameters (transformers raises a
    TypeError only when the optimizer is built, after the model loaded)."""
    import inspect

    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
    from transformers.trainer_utils import SchedulerType

    try:
        kind = SchedulerType(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    except ValueError:
        raise RecipeError(f"lr_scheduler_type: '{args.lr_scheduler_type}' is not one of "
                          f"{', '.join(t.value for t in SchedulerType)}.") from None
    given = set(args.lr_scheduler_kwargs or {})
    takes = set(inspect.signature(TYPE_TO_SCHEDULER_FUNCTION[kind]).parameters) - {
        "optimizer", "num_warmup_steps", "num_training_steps", "last_epoch"}
    if kind == SchedulerType.CONSTANT:
        takes = set()  # get_scheduler passes it no kwargs
    unknown = sorted(given - takes)
    if unknown:
        raise RecipeError(
            f"lr_scheduler_kwargs: {unknown} are not parameters of lr_scheduler_type {kind.value} "
            f"(it takes {sorted(takes) or 'none'}); remove them or choose the scheduler they belong to."
        )


def _writable(path: str) -> bool:
    """Whether ``path`` can be created or written: it, or its nearest existing parent, is writable."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return os.access(path, os.W_OK)


def check_training_values(args) -> None:
    """Values transformers accepts but fails on much later, or not at all."""
    positive = ["per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"]
    if str(getattr(args.save_strategy, "value", args.save_strategy)) == "steps":
        positive.append("save_steps")
    for name in positive:
        value = getattr(args, name)
        if not value > 0:
            raise RecipeError(f"{name} must be positive, got {value}.")
    for name in ("learning_rate", "weight_decay", "max_grad_norm", "warmup_steps"):
        value = getattr(args, name)
        if value is not None and not value >= 0:
            raise RecipeError(f"{name} must be >= 0, got {value}.")
    if args.global_batch_size is not None and args.global_batch_size <= 0:
        raise RecipeError(f"global_batch_size must be a positive number of sequences, got {args.global_batch_size}.")
    if args.output_dir and os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise RecipeError(f"output_dir: {args.output_dir} is a file, not a directory; choose another output_dir.")
    if args.output_dir and not _writable(args.output_dir):
        raise RecipeError(f"output_dir: {args.output_dir} cannot be written (permissions); choose a writable output_dir.")
    _check_report_to(args.report_to)


def _check_report_to(report_to) -> None:
    """An integration named but not installed fails only once training starts."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    names = [name for name in names if name not in ("none", "all")]
    unknown = [name for name in names if name not in INTEGRATION_TO_CALLBACK]
    if unknown:
        raise RecipeError(f"report_to: {unknown} are not integrations; use {', '.join(sorted(INTEGRATION_TO_CALLBACK))} or none.")
    available = get_available_reporting_integrations()
    missing = [name for name in names if name not in available]
    if missing:
        raise RecipeError(f"report_to: {', '.join(missing)} is not installed (pip install {' '.join(missing)}), "
                          "or set report_to: none / tensorboard.")


def refuse_per_device_loss_averaging(args) -> None:
    if not args.average_tokens_across_devices:
        raise RecipeError(
            "average_tokens_across_devices: false would average per-device means, which weighs tokens "
            "unequally across devices; remove it (the loss is a token mean over all devices)."
        )


def resolve_gradient_accumulation(args) -> None:
    """Derive gradient_accumulation_steps from global_batch_size, refusing batches that don't divide."""
    sp = getattr(args, "sequence_parallel_size", 1)
    if args.world_size % sp:
        raise RecipeError(
            f"sequence_parallel_size={sp} does not divide the {args.world_size} processes; "
            "launch a multiple of it or change sequence_parallel_size."
        )
    if args.global_batch_size is None:
        return
    per_step = args.per_device_train_batch_size * (args.world_size // sp)
    if args.global_batch_size % per_step:
        raise RecipeError(
            f"global_batch_size={args.global_batch_size} does not divide into per_device_train_batch_size="
            f"{args.per_device_train_batch_size} x {args.world_size // sp} data-parallel processes; "
            f"use a global_batch_size that is a multiple of {per_step}, or change the device count."
        )
    args.gradient_accumulation_steps = args.global_batch_size // per_step
