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
* memory knobs for the longest rows: ``activation_offload`` around the forward and
  ``tiled_mlp_tokens`` (``prolong.training.memory``), applied after the Trainer's Liger kernels;
  ``compile_decoder_layers`` (opt-in torch.compile of the decoder layers).

Shared with SFT, each in its own module: tokens/s and peak memory in the logs
(``prolong.training.throughput``), Hub pushes with our model card (``prolong.training.hub_push``),
save-and-stop on SIGTERM / SIGUSR1 and a checkpoint of the last step (``prolong.training.callbacks``).
CPT only: the stage hand-off (``prolong.training.stage_handoff``).
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from torch.utils.data import SequentialSampler
from transformers import Trainer

from prolong.checkpoint.checkpoints import CompleteCheckpointsMixin
from prolong.errors import RecipeError
from prolong.parallel import sequence_parallel_dataloader
from prolong.training.callbacks import PreemptionCallback, SaveAtEndCallback
from prolong.training.collator import IGNORE_INDEX, NOT_MODEL_INPUTS
from prolong.training.compat import check_save_on_cpu
from prolong.training.compile import compile_decoder_layers
from prolong.training.hub_push import HubPushMixin
from prolong.training.loss import (HiddenStateCapture, chunked_cross_entropy_sum, liger_linear_cross_entropy_sum,
                                   logit_scale_of, logit_softcap_of, trl_linear_cross_entropy_sum)
from prolong.training.memory import activation_offload, enable_tiled_mlp
from prolong.training.precision import reduce_gradients_in_fp32
from prolong.training.stage_handoff import load_previous_stage_optimizer
from prolong.training.throughput import ThroughputLogMixin

logger = logging.getLogger(__name__)

LOSS_KERNELS = {  # what runs, for the log
    "liger": "Liger's fused linear cross-entropy (CUDA)",
    "trl": "TRL's fused chunked log-prob kernel (ChunkedLogProbFunction)",
    "chunked": "chunked fp32 cross-entropy, each chunk recomputed in the backward (prolong.training.loss)",
}


class CPTTrainer(CompleteCheckpointsMixin, HubPushMixin, ThroughputLogMixin, Trainer):
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
        self._capture = HiddenStateCapture(unwrapped.get_decoder())
        self._lm_head = unwrapped.get_output_embeddings()
        self._softcap = logit_softcap_of(unwrapped.config)
        self._logit_scale = logit_scale_of(unwrapped.config)  # Granite, Cohere
        self.loss_kernel = self._choose_loss_kernel(type(unwrapped).__name__)
        self._liger_loss = None
        if self.loss_kernel == "liger":
            self._liger_loss = liger_linear_cross_entropy_sum(self._softcap)
        logger.info("Loss: %s", LOSS_KERNELS[self.loss_kernel])
        if self.args.activation_offload:
            check_save_on_cpu()  # at start-up, not as a TypeError in the first forward
        reduce_gradients_in_fp32(self.accelerator)
        self.add_callback(PreemptionCallback())
        self.add_callback(SaveAtEndCallback())

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
            load_previous_stage_optimizer(self, optimizer or self.optimizer)
        return super().create_scheduler(num_training_steps, optimizer)
