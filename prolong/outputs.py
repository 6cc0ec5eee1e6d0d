"""Logging set-up and the final save every entry point shares."""

from __future__ import annotations

import logging
import os
import shutil

import transformers

from prolong.model_card import write_model_card

logger = logging.getLogger(__name__)


def setup_logging(args) -> None:
    level = logging.INFO if args.process_index == 0 else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level)
    transformers.utils.logging.set_verbosity(level)


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
    trainer.save_model(staging)  # every process takes part (FSDP gathers); rank 0 writes
    if trainer.is_world_process_zero():
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
        # a model from an earlier run in this directory stops looking complete until the new one is in
        if os.path.exists(os.path.join(output_dir, "config.json")):
            os.remove(os.path.join(output_dir, "config.json"))
        names = sorted(os.listdir(staging), key=lambda name: name == "config.json")
        for name in names:
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
        shutil.rmtree(staging, ignore_errors=True)
        logger.info("Saved the final model to %s", output_dir)
    trainer.accelerator.wait_for_everyone()
    if trainer.args.push_to_hub:
        trainer.push_to_hub(commit_message=f"ProLong {stage}")
    return output_dir
