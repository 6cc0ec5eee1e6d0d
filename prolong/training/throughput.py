"""Tokens/s, step time and peak memory in the training logs of both stages.

A Trainer mixin, not a callback: the token count is read from each step's inputs, which callbacks
never see.
"""

from __future__ import annotations

import resource
import time

import torch


class ThroughputLogMixin:
    """Adds tokens/s, step time and peak memory to the Trainer's training logs."""

    _tokens_since_log = 0
    _step_of_last_log = 0
    _time_of_last_log = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._time_of_last_log is None:
            self._time_of_last_log = time.perf_counter()
            self._step_of_last_log = self.state.global_step  # a resumed run starts counting here
        self._tokens_since_log += inputs["input_ids"].numel()  # per process (an SP chunk with SP)
        return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._time_of_last_log is not None:
            now = time.perf_counter()
            elapsed = max(now - self._time_of_last_log, 1e-9)
            tokens = self._tokens_since_log * self.accelerator.num_processes
            steps = max(self.state.global_step - self._step_of_last_log, 1)
            logs["tokens_per_second"] = round(tokens / elapsed, 1)
            logs["tokens_per_second_per_device"] = round(tokens / elapsed / self.accelerator.num_processes, 1)
            logs["step_time_s"] = round(elapsed / steps, 3)
            if torch.cuda.is_available():
                logs["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            else:
                logs["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
            self._tokens_since_log, self._time_of_last_log = 0, now
            self._step_of_last_log = self.state.global_step
        super().log(logs, start_time)
