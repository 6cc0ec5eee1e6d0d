"""The SFT stage's trainer: TRL's SFTTrainer with what CPT's trainer also has (prolong/run_sft.py)."""

from __future__ import annotations

import trl

from prolong.checkpoint.checkpoints import CompleteCheckpointsMixin
from prolong.training.trainer import KeepModelCardMixin, ThroughputLogMixin, _PreemptionCallback


class SFTTrainer(CompleteCheckpointsMixin, KeepModelCardMixin, ThroughputLogMixin, trl.SFTTrainer):
    """TRL's SFTTrainer with our throughput logging (the SFT stage, prolong/run_sft.py)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(_PreemptionCallback())  # as CPT: a requeued SLURM job continues from that checkpoint
