"""Supervised fine-tuning of a long-context model on chat data (ProLong's final stage), with TRL.

    accelerate launch prolong/run_sft.py recipes/prolong-8b/sft.yaml [--field value ...]
    python prolong/run_sft.py recipes/tiny/sft.yaml --max_steps 5

Loss on assistant tokens only (any chat template, see prolong/sft_data.py), conversations packed whole
into padding-free rows with document masking, loss averaged over the tokens of the whole step.
"""

from __future__ import annotations

import logging

from transformers import set_seed
from trl import get_peft_config

from prolong.training.attention import guard_document_masking, log_probe_passed
from prolong.errors import cli_errors
from prolong.config import SFTModelConfig, SFTRecipeConfig, parse_recipe
from prolong.model import apply_chat_template_path, check_model_paths, load_model, load_tokenizer, resolve_dtype
from prolong.checkpoint.final_save import save_final_model
from prolong.runtime import close_process_group, exit_without_teardown, quiet_config_dumps, setup_logging
from prolong.checkpoint.checkpoints import finished_run, resolve_resume
from prolong.training.arguments import resolve_gradient_accumulation
from prolong.training.precision import check_master_weights, check_trainable_dtype
from prolong.training.sft_trainer import SFTTrainer, use_prepacked_rows
from prolong.data.storage import longest_row
from prolong.sft_data import load_sft_dataset, prepare_sft_dataset

logger = logging.getLogger("prolong.run_sft")


def main(argv: list[str] | None = None, callbacks: list | None = None) -> str:
    model_cfg, args, recipe = parse_recipe((SFTModelConfig, SFTRecipeConfig), argv, return_recipe=True)
    setup_logging(args)
    quiet_config_dumps()
    args.trust_remote_code = model_cfg.trust_remote_code
    resolve_gradient_accumulation(args)
    check_master_weights(resolve_dtype(model_cfg.dtype), args, model_cfg.low_precision_master_weights,
                         lora=model_cfg.use_peft)
    resume, claim_output_dir = resolve_resume(args, model_cfg, stage="sft")  # before any loading: refusals come at once
    if finished_run(args):
        return args.output_dir
    set_seed(args.seed)
    max_length = args.max_length

    check_model_paths(model_cfg)
    dataset = load_sft_dataset(args.dataset_name, args.dataset_config, args.dataset_split)  # fails before the model
    tokenizer = load_tokenizer(model_cfg)
    model = load_model(model_cfg, max_length)  # keeps the checkpoint's RoPE unless the recipe sets it
    model, tokenizer = apply_chat_template_path(model, tokenizer, args.chat_template_path)  # before our masks
    args.chat_template_path = None  # applied: SFTTrainer must not apply it again (after the masks)
    train_dataset, stats = prepare_sft_dataset(dataset, tokenizer, max_length, args.dataset_num_proc)
    if stats.kind == "packed":
        use_prepacked_rows(args)

    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_cfg),  # None unless use_peft
        callbacks=callbacks,
    )
    check_trainable_dtype(trainer.model, args, model_cfg.low_precision_master_weights)
    # on TRL's own collator and its packed rows, as training will see them
    guard_document_masking(trainer.model, args, trainer.data_collator, trainer.train_dataset,
                           packed=bool(args.packing))
    log_probe_passed(trainer.model, args)
    trained_length = longest_row(trainer.train_dataset)  # bins or pre-packed rows may stay below max_length
    logger.info("Training sequence length: %d tokens (longest packed row; max_length=%s)", trained_length, max_length)
    # the card of every push to the Hub and of the final model
    trainer.model_card_info = dict(base_model=model_cfg.model_name_or_path, stage="sft", recipe=recipe,
                                   max_length=trained_length)
    claim_output_dir()  # every input checked and loaded: from here output_dir holds this run
    trainer.train(resume_from_checkpoint=resume)

    output_dir = save_final_model(trainer, **trainer.model_card_info)
    close_process_group(trainer)
    return output_dir


def cli() -> None:
    """The `prolong-sft` console script, and `python prolong/run_sft.py` / `accelerate launch prolong/run_sft.py`."""
    cli_errors("run_sft")(main)()  # expected errors: one message, no traceback, exit 2
    exit_without_teardown()  # gloo runs end with os._exit: torch's gloo teardown can abort or hang (see prolong/runtime.py)


if __name__ == "__main__":
    cli()
