"""The continued pre-training Trainer: transformers' Trainer plus what long-context CPT needs.

What it adds, and why each is not already in transformers:

* ``compute_loss``: chunked cross-entropy over the decoder's hidden states (never the full
  tokens x vocab logits), summed and divided by the token count of the whole optimizer step
  (all accumulation micro-steps, all devices: the Trainer's ``num_items_in_batch``). On CUDA a
  fused linear cross-entropy runs instead by default (``loss_kernel``: Liger's, else TRL's); the
  start of the run logs which loss runs.
* a sequential sampler: ``MixtureDataset`` already shuffles deterministically; checkpoints
  record the sequences consumed and a resumed run continues at the next unseen one
  (``prolong.checkpoint.checkpoints``: complete checkpoints only, also with another batch size).
* tokens/s, step time and peak memory in the logs (``ThroughputLogMixin``, shared with SFT).
* stage hand-off: ``init_from`` + ``load_optimizer_state`` loads the previous stage's optimizer
  state (also FSDP2's sharded one) into a fresh optimizer whose learning-rate schedule starts over.
* preemption: SIGTERM / SIGUSR1 save a checkpoint, then stop.
* memory knobs for the longest rows: ``activation_offload`` around the forward and
  ``tiled_mlp_tokens`` (``prolong.training.memory``), applied after the Trainer's Liger kernels;
  ``compile_decoder_layers`` (opt-in torch.compile of the decoder layers).
"""

from __future__ import annotations

import datetime
import importlib.util
import logging
import os
import resource
import signal
import time

import torch
from torch.utils.data import SequentialSampler
from transformers import Trainer, TrainerCallback

from prolong.checkpoint.checkpoints import CompleteCheckpointsMixin, last_checkpoint
from prolong.training.collator import IGNORE_INDEX, NOT_MODEL_INPUTS
from prolong.errors import RecipeError
from prolong.data.hub import hub_error_message, hub_errors
from prolong.model_card import write_trainer_model_card
from prolong.training.loss import (chunked_cross_entropy_sum, liger_linear_cross_entropy_sum, logit_scale_of, logit_softcap_of,
                                   trl_linear_cross_entropy_sum)
from prolong.training.precision import reduce_gradients_in_fp32
from prolong.parallel import sequence_parallel_dataloader
from prolong.training.memory import activation_offload, enable_tiled_mlp
from prolong.redaction import move_hub_token_to_environment
from prolong.training.compile import compile_decoder_layers

logger = logging.getLogger(__name__)

LOSS_KERNELS = {  # what runs, for the log
    "liger": "Liger's fused linear cross-entropy (CUDA)",
    "trl": "TRL's fused chunked log-prob kernel (ChunkedLogProbFunction)",
    "chunked": "chunked fp32 cross-entropy, each chunk recomputed in the backward (prolong.training.loss)",
}


class _HiddenStateCapture:
    """Forward hook that keeps the decoder's final hidden states (post final norm)."""

    def __init__(self, module: torch.nn.Module):
        self.hidden = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state


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


class HubPushFailed(OSError):
    """A push to the Hub failed; the message says what was kept (the CLIs print it and exit 2)."""


class KeepModelCardMixin:
    """Our model card on every push to the Hub, and no token in what is pushed.

    ``push_to_hub`` calls ``create_model_card``, which would replace the card that
    ``prolong.checkpoint.final_save.save_final_model`` wrote (recipe, mixture, RoPE, figures) with a generic one.
    Checkpoint pushes during training (``hub_strategy``) upload output_dir with no card at all:
    with ``model_card_info`` set (write_model_card's recipe arguments; run_cpt/run_sft set it) ours
    is written there first. ``hub_token`` leaves the arguments, which the Trainer pickles into
    training_args.bin and uploads (``prolong.redaction``).
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
        super()._finish_current_push()
        self._report_failed_pushes()

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


class CPTTrainer(CompleteCheckpointsMixin, KeepModelCardMixin, ThroughputLogMixin, Trainer):
    # our compute_loss divides by the whole step's token count itself
    loss_is_scaled_for_ga = True

    def __init__(self, *args, parallel_layout=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.parallel_layout = parallel_layout  # set when sequence parallelism is on
        # make the Trainer count label tokens over the whole step for any model class
        self.model_accepts_loss_kwargs = True
        if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            # ZeRO-3 gathers lm_head's weight only inside the forward; the loss reads it afterwards
            raise RecipeError(
                "DeepSpeed ZeRO-3 is not supported for continued pre-training (the chunked loss applies "
                "lm_head outside the model's forward): use accelerate_configs/fsdp2.yaml. ZeRO-3 works for SFT."
            )
        unwrapped = self.model
        self._capture = _HiddenStateCapture(unwrapped.get_decoder())
        self._lm_head = unwrapped.get_output_embeddings()
        self._softcap = logit_softcap_of(unwrapped.config)
        self._logit_scale = logit_scale_of(unwrapped.config)  # Granite, Cohere
        self.loss_kernel = self._choose_loss_kernel(type(unwrapped).__name__)
        self._liger_loss = None
        if self.loss_kernel == "liger":
            self._liger_loss = liger_linear_cross_entropy_sum(self._softcap)
        logger.info("Loss: %s", LOSS_KERNELS[self.loss_kernel])
        reduce_gradients_in_fp32(self.accelerator)
        self.add_callback(_PreemptionCallback())
        self.add_callback(_SaveAtEndCallback())

    def _choose_loss_kernel(self, model_name: str) -> str:
        requested, cuda = self.args.loss_kernel, torch.cuda.is_available()
        if requested == "auto":
            if not cuda:
                return "chunked"
            # Liger cannot apply a logit scale (Granite, Cohere); TRL's kernel can
            liger = importlib.util.find_spec("liger_kernel") is not None and self._logit_scale is None
            return "liger" if liger else "trl"
        if requested == "liger" and not cuda:
            raise RecipeError("loss_kernel: liger needs CUDA (Triton); use loss_kernel: auto on this machine.")
        if requested == "liger" and self._logit_scale is not None:
            raise RecipeError(
                f"loss_kernel: liger cannot apply {model_name}'s logit scale ({self._logit_scale:g}); "
                "use loss_kernel: auto or trl (both apply it)."
            )
        return requested

    # -- set-up inside train() ---------------------------------------------------------------
    def _inner_training_loop(self, *args, **kwargs):
        # transformers 5.24's train() applies Liger's kernels (an instance patch of every MLP's
        # forward) and turns on activation checkpointing just before it calls this method, so the
        # MLPs are tiled here, after Liger: tiling in __init__ had Liger replace the tiled forward.
        # The same point for torch.compile: it must see the final layer code.
        model = self.accelerator.unwrap_model(self.model)
        if self.args.tiled_mlp_tokens:
            enable_tiled_mlp(model, self.args.tiled_mlp_tokens)
        if self.args.compile_decoder_layers:
            compile_decoder_layers(model, self.args.compile_decoder_layers)
        return super()._inner_training_loop(*args, **kwargs)

    # -- data --------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset or self.train_dataset)

    def get_train_dataloader(self):
        if self.parallel_layout is None:
            return super().get_train_dataloader()
        # the ranks of a sequence-parallel group read the same batch: deal batches by
        # data-parallel rank (accelerate would deal them over all processes)
        return sequence_parallel_dataloader(
            self.train_dataset,
            self.args.per_device_train_batch_size,
            self.data_collator,
            self.parallel_layout,
            sampler=self._get_train_sampler(),
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )

    # -- loss --------------------------------------------------------------------------------
    def _get_num_items_in_batch(self, batch_samples, device):
        # The loss tokens of the whole optimizer step on every process: the targets our loss sums
        # (`shift_labels`). The Trainer's own count skips batches without `labels`, which
        # sequence-parallel chunks drop (a local shift would lose the target at each chunk edge);
        # without a count the loss would go unnormalised. Chunks are disjoint: the sum is exact.
        count = sum((batch["shift_labels"] != IGNORE_INDEX).sum() for batch in batch_samples)
        if self.args.world_size > 1:  # average_tokens_across_devices is enforced by the config
            count = self.accelerator.gather(count.to(device)).sum()
        return count.to(device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        shift_labels = inputs["shift_labels"]
        model_inputs = {k: v for k, v in inputs.items() if k not in NOT_MODEL_INPUTS}
        # logits_to_keep=1: the model computes one row of logits; the loss uses the hidden states
        with activation_offload(self.args.activation_offload):
            outputs = model(**model_inputs, use_cache=False, logits_to_keep=1)
        hidden = self._capture.hidden
        self._capture.hidden = None
        if self._liger_loss is not None:
            loss_sum = self._liger_loss(
                self._lm_head.weight, hidden.reshape(-1, hidden.shape[-1]), shift_labels.reshape(-1),
                self._lm_head.bias,
            )
        elif self.loss_kernel == "trl":
            loss_sum = trl_linear_cross_entropy_sum(
                hidden, self._lm_head.weight, shift_labels, self._softcap, self._lm_head.bias, self._logit_scale
            )
        else:
            loss_sum = chunked_cross_entropy_sum(
                hidden, self._lm_head.weight, shift_labels, self.args.loss_chunk_size, self._softcap,
                lm_head_bias=self._lm_head.bias, logit_scale=self._logit_scale,
            )
        # keeps every parameter in the graph (DDP needs it) even if no token here has a label
        loss_sum = loss_sum + 0.0 * outputs.logits.sum()
        if num_items_in_batch is None:  # evaluation: a plain token mean over this batch
            loss = loss_sum / (shift_labels != IGNORE_INDEX).sum().clamp(min=1)
        else:
            # num_items_in_batch counts the valid tokens of the whole optimizer step on all
            # processes; DDP/FSDP then average gradients over processes, which the factor undoes.
            # clamp: a step without any target (fully masked rows) has loss_sum 0; 0/0 would turn
            # every weight into NaN through the optimizer
            loss = loss_sum / num_items_in_batch.clamp(min=1) * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    # -- stage hand-off ----------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        self._resuming = bool(resume_from_checkpoint)  # a resumed run restores its own optimizer
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        # The Trainer calls this once the optimizer is prepared (its state sharded under FSDP2)
        # and before it restores a checkpoint of this run: the place to take over the previous
        # stage's moments, just before the new schedule records its starting learning rate.
        if self.args.load_optimizer_state and not getattr(self, "_resuming", False) and self.lr_scheduler is None:
            self._load_previous_stage_optimizer(optimizer or self.optimizer)
        return super().create_scheduler(num_training_steps, optimizer)

    def _load_previous_stage_optimizer(self, optimizer) -> None:
        checkpoint = last_checkpoint(self.args.init_from) or self.args.init_from
        if self.is_deepspeed_enabled:
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
        if self.is_fsdp_enabled:
            if saved[0] == "optimizer.pt":
                raise ValueError(
                    f"load_optimizer_state: {checkpoint} was saved without FSDP; run this stage with the "
                    "previous stage's accelerate config, or set load_optimizer_state: false."
                )
            from accelerate.utils import load_fsdp_optimizer

            # reshards to this run's world size (torch.distributed.checkpoint)
            load_fsdp_optimizer(self.accelerator.state.fsdp_plugin, self.accelerator, optimizer, self.model, checkpoint)
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


class _PreemptionCallback(TrainerCallback):
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


class _SaveAtEndCallback(TrainerCallback):
    """Always checkpoint the last step: the next stage hands off from it (optimizer included)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps and args.save_strategy != "no":
            control.should_save = True
        return control
