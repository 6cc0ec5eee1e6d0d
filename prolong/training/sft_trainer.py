"""The SFT stage's trainer: TRL's SFTTrainer with what CPT's trainer also has (prolong/run_sft.py),
and the switch for rows that prolong-data already packed."""

from __future__ import annotations

import trl

from prolong.checkpoint.checkpoints import CompleteCheckpointsMixin
from prolong.errors import RecipeError
from prolong.training.arguments import refuse_per_device_loss_averaging
from prolong.training.callbacks import PreemptionCallback
from prolong.training.hub_push import HubPushMixin
from prolong.training.precision import reduce_gradients_in_fp32
from prolong.training.throughput import ThroughputLogMixin


class SFTTrainer(CompleteCheckpointsMixin, HubPushMixin, ThroughputLogMixin, trl.SFTTrainer):
    """TRL's SFTTrainer with CPT's complete checkpoints, Hub pushes, throughput logs and preemption (prolong/run_sft.py)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_token_averaging()
        reduce_gradients_in_fp32(self.accelerator)
        self.add_callback(PreemptionCallback())  # as CPT: a requeued SLURM job continues from that checkpoint

    def _check_token_averaging(self) -> None:
        """The loss must be a mean over every target token of the optimizer step (all micro-batches,
        all devices). Trainer only counts them (num_items_in_batch) when the model takes loss kwargs."""
        if not (self.model_accepts_loss_kwargs or self.compute_loss_func is not None):
            raise RecipeError(
                f"{type(self.model).__name__} takes no loss kwargs, so the Trainer would not count the target "
                "tokens of the whole step and would average per-micro-batch means; use a transformers causal LM."
            )
        refuse_per_device_loss_averaging(self.args)


def use_prepacked_rows(args) -> None:
    """prolong-data rows are already packed: TRL must neither re-pack nor truncate them, only collate
    them padding-free (seq_lengths -> position_ids restarts, no attention mask)."""
    args.packing = False
    args.padding_free = True
    args.max_length = None
