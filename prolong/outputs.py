"""Logging set-up and the final save every entry point shares."""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
import sys

import torch
import transformers

from prolong.model_card import write_model_card

logger = logging.getLogger(__name__)


def setup_logging(args) -> None:
    level = logging.INFO if args.process_index == 0 else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level)
    transformers.utils.logging.set_verbosity(level)


# weight and adapter files of a saved model (sharded or not), removed before a new final model moves in
MODEL_FILES = (
    "model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json",
    "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "generation_config.json",
)


def save_full_weights(trainer, path: str) -> None:
    """trainer.save_model, with full (gathered) weights even when checkpoints are sharded.

    Every process takes part (FSDP gathers, DeepSpeed consolidates); rank 0 writes. With FSDP's
    SHARDED_STATE_DICT (our fsdp2.yaml: fast checkpoints) the Trainer's save_model writes nothing
    at all, so the final save switches to FULL_STATE_DICT for its duration.
    """
    plugin = trainer.accelerator.state.fsdp_plugin if trainer.is_fsdp_enabled else None
    if plugin is None or "FULL_STATE_DICT" in str(plugin.state_dict_type):
        trainer.save_model(path)
        return
    previous = (plugin.state_dict_type, plugin.state_dict_config, plugin.optim_state_dict_config)
    # set_state_dict_type only fills configs that are None (FSDP1 reads them; FSDP2 gathers anyway)
    plugin.state_dict_config = plugin.optim_state_dict_config = None
    plugin.set_state_dict_type("FULL_STATE_DICT")
    try:
        trainer.save_model(path)
    finally:
        plugin.state_dict_type, plugin.state_dict_config, plugin.optim_state_dict_config = previous


def require_loadable_weights(path: str) -> None:
    """Refuse to publish a final model directory that from_pretrained could not load."""
    has = lambda name: os.path.isfile(os.path.join(path, name))  # noqa: E731
    full_model = has("config.json") and (has("model.safetensors") or has("model.safetensors.index.json"))
    adapter = has("adapter_config.json") and has("adapter_model.safetensors")
    if not (full_model or adapter):
        raise RuntimeError(
            f"The final save wrote no loadable model to {path} (files: {sorted(os.listdir(path))}); "
            "the training checkpoints in output_dir are intact. With DeepSpeed ZeRO-3 set "
            "stage3_gather_16bit_weights_on_model_save: true."
        )


def save_final_model(trainer, *, base_model, stage, recipe, max_length, mixture=None) -> str:
    """Save model, tokenizer and model card to output_dir, atomically, and push if asked.

    Files are written to ``output_dir/.final-tmp`` first and moved into place with config.json
    last, so an interrupted save never leaves a directory that ``from_pretrained`` would load.
    """
    output_dir = trainer.args.output_dir
    if trainer.state.global_step < trainer.state.max_steps:  # preempted: the checkpoint is the state
        logger.warning(
            "Stopped at step %d of %d: no final model written; continue with --resume_from_checkpoint true.",
            trainer.state.global_step,
            trainer.state.max_steps,
        )
        return output_dir
    staging = os.path.join(output_dir, ".final-tmp")
    if trainer.is_world_process_zero():
        shutil.rmtree(staging, ignore_errors=True)  # leftovers of an interrupted save
    trainer.accelerator.wait_for_everyone()
    save_full_weights(trainer, staging)
    if trainer.is_world_process_zero():
        require_loadable_weights(staging)
        trainer.state.save_to_json(os.path.join(staging, "trainer_state.json"))  # the loss curve, for the record
        model = trainer.accelerator.unwrap_model(trainer.model)
        write_model_card(
            staging,
            name=os.path.basename(os.path.abspath(output_dir)),
            load_path=output_dir,
            base_model=base_model,
            stage=stage,
            recipe=recipe,
            rope_parameters=model.config.get_text_config().rope_parameters,
            max_length=max_length,
            mixture=mixture,
            log_history=trainer.state.log_history,
        )
        # a model from an earlier run in this directory stops looking complete until the new one
        # is in, and none of its weight files may outlive it (a stale adapter_config.json would
        # make from_pretrained apply an old LoRA adapter to the new weights)
        for name in os.listdir(output_dir):
            if name == "config.json" or any(fnmatch.fnmatch(name, pattern) for pattern in MODEL_FILES):
                os.remove(os.path.join(output_dir, name))
        names = sorted(os.listdir(staging), key=lambda name: name == "config.json")
        for name in names:
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
        shutil.rmtree(staging, ignore_errors=True)
        logger.info("Saved the final model to %s", output_dir)
    trainer.accelerator.wait_for_everyone()
    if trainer.args.push_to_hub:
        trainer.push_to_hub(commit_message=f"ProLong {stage}")
    return output_dir


def close_process_group(trainer) -> None:
    """Destroy the process group at the end of a completed NCCL run (torch asks for it). gloo
    groups are left to `exit_without_teardown`; a stopped (preempted) run keeps its group too."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_backend() != "gloo" and trainer.state.global_step >= trainer.state.max_steps:
        trainer.end()


def exit_without_teardown() -> None:
    """End a gloo (CPU) distributed process right away, once its outputs are written.

    gloo's worker threads can still hold finished work objects whose tensors need the GIL to be
    freed, while the group's destructor (at interpreter teardown, or when the DDP reducer drops the
    last reference after destroy_process_group) joins those threads holding the GIL: the process
    then aborts ("terminate called without an active exception") or hangs (pytorch/pytorch#190489,
    #179291). Seen in CI and under preemption tests. Leaving with os._exit skips that teardown.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_backend() == "gloo":
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
