"""Pushes to the Hub from both trainers: our model card on every push, no token in what is pushed,
failed pushes reported instead of lost."""

from __future__ import annotations

import logging
import os

from prolong.data.hub import hub_error_message, hub_errors
from prolong.model_card import write_trainer_model_card
from prolong.redaction import move_hub_token_to_environment

logger = logging.getLogger(__name__)


class HubPushFailed(OSError):
    """A push to the Hub failed; the message says what was kept (the CLIs print it and exit 2)."""


class HubPushMixin:
    """Our model card on every push to the Hub, and no token in what is pushed.

    ``push_to_hub`` calls ``create_model_card``, which would replace the card that
    ``prolong.checkpoint.final_save.save_final_model`` wrote (recipe, mixture, RoPE, figures) with a generic one.
    Checkpoint pushes during training (``hub_strategy``) upload output_dir with no card at all:
    with ``model_card_info`` set (write_model_card's recipe arguments; run_cpt/run_sft set it) ours
    is written there first. ``hub_token`` leaves the arguments, which the Trainer pickles into
    training_args.bin and uploads (``prolong.redaction``).

    Goes with ``CompleteCheckpointsMixin``, whose rotation keeps a checkpoint while it uploads:
    ``_finish_current_push`` (this class is its one override) lets rotation remove it afterwards.
    """

    model_card_info: dict | None = None

    def __init__(self, *args, **kwargs):
        try:
            super().__init__(*args, **kwargs)  # creates the Hub repo (push_to_hub) with the token still there
        except hub_errors() as error:
            training_args = kwargs.get("args")
            repo = getattr(training_args, "hub_model_id", None) or "the output_dir's name"
            raise HubPushFailed(f"push_to_hub: cannot create the model repository: {hub_error_message(error, repo)}") \
                from error
        move_hub_token_to_environment(self.args)

    def push_to_hub(self, *args, **kwargs):
        try:
            return super().push_to_hub(*args, **kwargs)
        except hub_errors() as error:
            output_dir = self.args.output_dir
            raise HubPushFailed(
                f"push_to_hub: {hub_error_message(error, self.hub_model_id)}. The trained model is complete in "
                f"{output_dir}: push it later with `hf upload {self.hub_model_id} {output_dir}`") from error

    def create_model_card(self, *args, **kwargs):
        if os.path.exists(os.path.join(self.args.output_dir, "README.md")):
            return None
        return super().create_model_card(*args, **kwargs)

    def save_model(self, output_dir=None, _internal_call=False):
        # never push from here: prolong.checkpoint.final_save.save_final_model saves into a staging directory and
        # pushes once the final model is complete (the Trainer's push would upload output_dir mid-save)
        super().save_model(output_dir, _internal_call=True)

    def _push_from_checkpoint(self, checkpoint_folder):
        if not self.is_world_process_zero() or self.args.hub_strategy == "end":
            return
        previous = getattr(self, "push_in_progress", None)
        if previous is not None and not previous.is_done():
            if not self.args.hub_always_push:  # the Trainer would skip it without a word
                logger.warning("Step %d: the previous checkpoint push to %s is still running, so this checkpoint "
                               "is not pushed (hub_always_push: true waits for it instead).",
                               self.state.global_step, self.hub_model_id)
                return
            # transformers 5.24 would now copy this checkpoint's files into output_dir while the previous push
            # (a background upload of output_dir) still reads them: that commit then fails on a changed file,
            # and nobody hears of it. Wait for it instead (training pauses only while a push is late)
            logger.info("Step %d: waiting for the previous checkpoint push to finish.", self.state.global_step)
            self._finish_current_push()
        self._report_failed_pushes()
        if self.model_card_info is not None:
            write_trainer_model_card(self, self.args.output_dir, **self.model_card_info)
        super()._push_from_checkpoint(checkpoint_folder)
        for job in getattr(self.push_in_progress, "jobs", []):
            if not hasattr(job, "prolong_step"):  # for the messages, and so rotation keeps a folder still uploading
                job.prolong_step, job.prolong_checkpoint = self.state.global_step, os.path.realpath(checkpoint_folder)

    def _finish_current_push(self):
        super()._finish_current_push()  # waits for the push
        self._report_failed_pushes()
        if self.args.should_save:  # checkpoints that rotation kept while they were uploading
            self._rotate_complete_checkpoints(self.args.output_dir)

    def _report_failed_pushes(self):
        """Checkpoint pushes run as futures whose errors the Trainer never reads (PushInProgress only waits)."""
        push = getattr(self, "push_in_progress", None)
        if push is None or not push.is_done():
            return
        failures = {(getattr(job, "prolong_step", "?"), hub_error_message(job.exception(), self.hub_model_id))
                    for job in push.jobs if not job.cancelled() and job.exception() is not None}
        for step, message in sorted(failures, key=str):  # output_dir and last-checkpoint/ often fail alike
            logger.warning("The checkpoint push of step %s to %s failed: %s. Training goes on; the Hub keeps the "
                           "previous push until a later one succeeds.", step, self.hub_model_id, message)
        self.push_in_progress = None  # each failure is reported once
