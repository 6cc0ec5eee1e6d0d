"""Stage hand-off: the previous stage's optimizer state (``init_from`` + ``load_optimizer_state``)
loaded into this stage's fresh optimizer, whose learning-rate schedule starts over."""

from __future__ import annotations

import logging
import os

import torch

from prolong.checkpoint.checkpoints import last_checkpoint

logger = logging.getLogger(__name__)


def load_previous_stage_optimizer(trainer, optimizer) -> None:
    """Load the optimizer state saved with ``trainer.args.init_from`` (its newest checkpoint) into ``optimizer``:
    the moments of the previous stage, the hyper-parameters of this one."""
    checkpoint = last_checkpoint(trainer.args.init_from) or trainer.args.init_from
    if trainer.is_deepspeed_enabled:
        raise NotImplementedError(
            "load_optimizer_state with DeepSpeed is not supported: use accelerate_configs/fsdp2.yaml for "
            "the stage hand-off, or set load_optimizer_state: false to start a fresh optimizer."
        )
    # what the previous stage's Trainer saved: optimizer.pt (single device, DDP), or through
    # accelerate under FSDP: optimizer_0/ (sharded state dict) or optimizer.bin (full)
    saved = [name for name in ("optimizer.pt", "optimizer_0", "optimizer.bin")
             if os.path.exists(os.path.join(checkpoint, name))]
    if not saved:
        raise FileNotFoundError(
            f"load_optimizer_state: no optimizer state in {checkpoint}. The previous stage must save "
            "checkpoints (save_strategy: steps); set load_optimizer_state: false to start a fresh optimizer."
        )
    fresh_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    if trainer.is_fsdp_enabled:
        if saved[0] == "optimizer.pt":
            raise ValueError(
                f"load_optimizer_state: {checkpoint} was saved without FSDP; run this stage with the "
                "previous stage's accelerate config, or set load_optimizer_state: false."
            )
        from accelerate.utils import load_fsdp_optimizer

        # reshards to this run's world size (torch.distributed.checkpoint)
        accelerator = trainer.accelerator
        load_fsdp_optimizer(accelerator.state.fsdp_plugin, accelerator, optimizer, trainer.model, checkpoint)
    else:
        if saved[0] != "optimizer.pt":
            raise ValueError(
                f"load_optimizer_state: {checkpoint} holds an FSDP optimizer state ({saved[0]}); run this "
                "stage with the previous stage's FSDP accelerate config, or set load_optimizer_state: false."
            )
        path = os.path.join(checkpoint, "optimizer.pt")
        optimizer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    # keep the moments, but this stage's hyper-parameters; dropping `initial_lr` makes the
    # new scheduler start from this stage's peak learning rate
    for group, fresh in zip(optimizer.param_groups, fresh_groups):
        group.pop("initial_lr", None)
        group.update(fresh)
    logger.info("Loaded the optimizer state of the previous stage from %s", checkpoint)
