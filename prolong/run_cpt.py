"""Continued pre-training of a causal LM on long + short documents (ProLong stages 1 and 2).

    accelerate launch prolong/run_cpt.py recipes/prolong-8b/stage1.yaml [--field value ...]
    python prolong/run_cpt.py recipes/tiny/cpt.yaml --max_steps 10
"""

from __future__ import annotations

from transformers import set_seed

from prolong.checkpoint.checkpoints import finished_run, resolve_resume
from prolong.checkpoint.final_save import save_final_model
from prolong.config import CPTConfig, DataConfig, ModelConfig, parse_recipe
from prolong.errors import cli_errors
from prolong.model import check_model_paths, load_model, load_tokenizer, resolve_dtype
from prolong.parallel import SequenceParallelCollator, enable_sequence_parallel, init_parallel_layout
from prolong.runtime import close_process_group, exit_without_teardown, quiet_config_dumps, setup_logging
from prolong.training.arguments import resolve_gradient_accumulation
from prolong.training.attention import guard_document_masking, log_probe_passed
from prolong.training.collator import PackedCollator
from prolong.training.mixture import build_train_dataset
from prolong.training.precision import check_master_weights, check_trainable_dtype
from prolong.training.trainer import CPTTrainer


def main(argv: list[str] | None = None, callbacks: list | None = None) -> str:
    model_cfg, data_cfg, args, recipe = parse_recipe((ModelConfig, DataConfig, CPTConfig), argv, return_recipe=True)
    setup_logging(args)
    quiet_config_dumps()
    resolve_gradient_accumulation(args)
    check_master_weights(resolve_dtype(model_cfg.dtype), args, model_cfg.low_precision_master_weights)
    resume, claim_output_dir = resolve_resume(args, model_cfg, data_cfg, stage="continued-pretraining")  # before any loading
    if finished_run(args):
        return args.output_dir
    set_seed(args.seed)

    check_model_paths(model_cfg, args.init_from)
    train_dataset, trained_length = build_train_dataset(data_cfg, args)  # before the model: bad data fails at once

    tokenizer = load_tokenizer(model_cfg)
    model = load_model(model_cfg, trained_length, path=args.init_from)
    collator, layout = PackedCollator(), None
    guard_document_masking(model, args, collator, train_dataset)  # the collator the trainer gets (SP only splits its row)
    log_probe_passed(model, args)
    if args.sequence_parallel_size > 1:  # after the probe, which runs a whole row without SP
        layout = init_parallel_layout(args.sequence_parallel_size)
        enable_sequence_parallel(model, layout.sp_group)
        collator = SequenceParallelCollator(collator, layout.sp_rank, layout.sp_size, tokenizer.pad_token_id or 0)

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
    check_trainable_dtype(trainer.model, args, model_cfg.low_precision_master_weights)
    for callback in callbacks:  # RecallEvalCallback logs through trainer.log, so its scores reach report_to
        if hasattr(callback, "attach"):
            callback.attach(trainer)
    trainer.model_card_info = dict(  # the card of every push to the Hub and of the final model
        base_model=args.init_from or model_cfg.model_name_or_path,
        stage="continued-pretraining",
        recipe=recipe,
        max_length=trained_length,  # what the rows held, which check_packed_lengths tied to max_length
        mixture=data_cfg.dataset_mixture,
    )
    claim_output_dir()  # every input checked and loaded: from here output_dir holds this run
    trainer.train(resume_from_checkpoint=resume)

    output_dir = save_final_model(trainer, **trainer.model_card_info)
    close_process_group(trainer)
    return output_dir


def cli() -> None:
    """The `prolong-cpt` console script, and `python prolong/run_cpt.py` / `accelerate launch prolong/run_cpt.py`."""
    cli_errors("run_cpt")(main)()  # expected errors: one message, no traceback, exit 2
    exit_without_teardown()  # gloo runs end with os._exit: torch's gloo teardown can abort or hang (see prolong/runtime.py)


if __name__ == "__main__":
    cli()
