"""Trainer callbacks both training stages add: save and stop on preemption, save the last step."""

from __future__ import annotations

import datetime
import logging
import signal

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class PreemptionCallback(TrainerCallback):
    """SIGTERM / SIGUSR1 (SLURM preemption, spot instances) -> save a checkpoint and stop.

    The signal reaches the ranks at different moments; every step the ranks agree (a max over a
    one-element tensor) so that all of them stop after the same step. A rank stopping alone would
    leave the others waiting in a collective. The flag is a CPU tensor agreed over a gloo group
    (the default group when it is gloo, else one made at the start of training): an all-reduce of a
    CUDA tensor read with ``.item()`` made the host wait for the GPU to finish every step, which
    empties the queue of kernels the host had launched ahead.
    """

    def __init__(self):
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread (e.g. inside a notebook worker)
                pass

    def _on_signal(self, signum, frame):
        logger.warning("Received signal %d: saving a checkpoint after this step, then stopping.", signum)
        self.requested = True

    def on_train_begin(self, args, state, control, **kwargs):
        dist = torch.distributed
        self._distributed = dist.is_available() and dist.is_initialized()
        self._group = None  # the default group
        if self._distributed and "gloo" not in str(dist.get_backend()):
            # every rank calls on_train_begin; the default group's timeout (ddp_timeout), not gloo's
            # 30 min: ranks waiting here for one writing a large checkpoint must not time out first
            self._group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=args.ddp_timeout))

    def on_step_end(self, args, state, control, **kwargs):
        requested = self.requested
        if getattr(self, "_distributed", False):
            flag = torch.tensor([int(requested)])  # host memory: no device sync
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._group)
            requested = bool(flag[0])
        if requested:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self._previous.items():  # after training, a signal ends the process again
            signal.signal(sig, handler)
        self._previous = {}


class SaveAtEndCallback(TrainerCallback):
    """Always checkpoint the last step: the next stage hands off from it (optimizer included)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps and args.save_strategy != "no":
            control.should_save = True
        return control
