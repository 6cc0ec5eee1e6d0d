"""Continued pre-training of a causal LM on long + short documents (ProLong stages 1 and 2).

    accelerate launch prolong/run_cpt.py recipes/prolong-8b/stage1.yaml [--field value ...]
    python prolong/run_cpt.py recipes/tiny/cpt.yaml --max_steps 10
"""

from __future__ import annotations

import logging
import os
import sys

if __package__ in (None, ""):  # `python prolong/run_cpt.py` from a checkout that is not pip-installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import set_seed

from prolong.attention import guard_document_masking
from prolong.errors import cli_errors
from prolong.collator import PackedCollator
from prolong.config import CPTConfig, DataConfig, ModelConfig, RecipeError, parse_recipe, resolve_gradient_accumulation
from prolong.data.mixture import BalancedOrder, MixtureDataset
from prolong.model import load_model, load_tokenizer
from prolong.parallel import SequenceParallelCollator, enable_sequence_parallel, init_parallel_layout
from prolong.outputs import close_process_group, exit_without_teardown, save_final_model, setup_logging
from prolong.checkpoints import resolve_resume
from prolong.trainer import CPTTrainer

logger = logging.getLogger("prolong.run_cpt")


def build_train_dataset(data: DataConfig, args: CPTConfig):
    if not data.dataset_mixture:
        raise RecipeError("dataset_mixture is missing: map packed dataset directories to token shares.")
    if args.max_steps <= 0:
        raise RecipeError("max_steps must be set: the mixture is sampled by steps, not epochs.")
    data_parallel = args.world_size // args.sequence_parallel_size
    sequences_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * data_parallel
    dataset = MixtureDataset(
        data.dataset_mixture, data.max_length, num_sequences=args.max_steps * sequences_per_step, seed=args.seed
    )
    if data.balance_attention_cost:
        dataset = BalancedOrder(
            dataset, args.per_device_train_batch_size, data_parallel, args.gradient_accumulation_steps
        )
    return dataset


def main(argv: list[str] | None = None, callbacks: list | None = None) -> str:
    model_cfg, data_cfg, args, recipe = parse_recipe((ModelConfig, DataConfig, CPTConfig), argv, return_recipe=True)
    setup_logging(args)
    resolve_gradient_accumulation(data_cfg, args)
    resume = resolve_resume(args)  # before any loading: an output_dir it would refuse fails at once
    set_seed(args.seed)

    tokenizer = load_tokenizer(model_cfg)
    model = load_model(model_cfg, data_cfg.max_length, path=args.init_from)
    guard_document_masking(model, args)
    collator, layout = PackedCollator(), None
    if args.sequence_parallel_size > 1:  # after the probe, which runs a whole row without SP
        layout = init_parallel_layout(args.sequence_parallel_size)
        enable_sequence_parallel(model, layout.sp_group)
        collator = SequenceParallelCollator(collator, layout.sp_rank, layout.sp_size, tokenizer.pad_token_id or 0)
    train_dataset = build_train_dataset(data_cfg, args)

    callbacks = list(callbacks or [])
    if args.eval_recall_lengths:
        from evaluation.callback import RecallEvalCallback

        callbacks.append(RecallEvalCallback(lengths=args.eval_recall_lengths, num_samples=args.eval_recall_samples))
    trainer = CPTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
        parallel_layout=layout,
    )
    trainer.model_card_info = dict(  # the card of every push to the Hub and of the final model
        base_model=args.init_from or model_cfg.model_name_or_path,
        stage="continued-pretraining",
        recipe=recipe,
        max_length=data_cfg.max_length,
        mixture=data_cfg.dataset_mixture,
    )
    trainer.train(resume_from_checkpoint=resume)

    output_dir = save_final_model(trainer, **trainer.model_card_info)
    close_process_group(trainer)
    return output_dir


if __name__ == "__main__":
    cli_errors("run_cpt")(main)()  # expected errors: one message, no traceback, exit 2
    exit_without_teardown()
