"""Continued pre-training of a causal LM on long + short documents (ProLong stages 1 and 2).

    accelerate launch prolong/run_cpt.py recipes/prolong-8b/stage1.yaml [--field value ...]
    python prolong/run_cpt.py recipes/tiny/cpt.yaml --max_steps 10
"""

from __future__ import annotations

import logging

from transformers import set_seed

from prolong.training.attention import guard_document_masking, log_probe_passed
from prolong.errors import RecipeError, cli_errors
from prolong.training.collator import PackedCollator
from prolong.config import CPTConfig, DataConfig, ModelConfig, parse_recipe
from prolong.training.mixture import BalancedOrder, MixtureDataset
from prolong.data.storage import longest_row, read_metadata
from prolong.model import check_model_paths, load_model, load_tokenizer, resolve_dtype
from prolong.parallel import SequenceParallelCollator, enable_sequence_parallel, init_parallel_layout
from prolong.checkpoint.final_save import save_final_model
from prolong.runtime import close_process_group, exit_without_teardown, quiet_config_dumps, setup_logging
from prolong.checkpoint.checkpoints import finished_run, resolve_resume
from prolong.training.arguments import resolve_gradient_accumulation
from prolong.training.precision import check_master_weights, check_trainable_dtype
from prolong.training.trainer import CPTTrainer

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


def log_mixture_summary(mixture: MixtureDataset, shares: dict) -> None:
    """One block at start: what each domain holds and how often the run will see it."""
    lines = [f"Data mixture: {mixture.num_sequences} sequences of <= {mixture.max_length} tokens"]
    for path, items, count in zip(mixture.paths, mixture.num_items, mixture.block_counts):
        drawn = mixture.num_sequences * int(count) / mixture.block_size
        lines.append(f"  {shares[path]:>6.1%} of tokens  {path}: {items} sequences, ~{drawn:.0f} drawn "
                     f"({drawn / items:.2f} epochs)")
    logger.info("\n".join(lines))


def check_packed_lengths(mixture: MixtureDataset, data: DataConfig) -> int:
    """Compare ``max_length`` with the length each domain was packed at; return the length trained.

    A domain packed shorter than max_length gives rows of its packed length, so a context-extension
    run would silently train short. Long data must reach max_length; short data may be packed
    shorter only where the recipe lists it in ``allow_packed_shorter``.
    """
    allowed = set(data.allow_packed_shorter or [])
    trained = 0
    for path, local_path, dataset in zip(mixture.paths, mixture.local_paths, mixture.datasets):
        metadata = read_metadata(local_path) or {}
        mode = metadata.get("mode")
        # no metadata (a dataset not written by prolong-data): its longest row, from the Arrow offsets
        length = int(metadata.get("length") or 0) or longest_row(dataset)
        if length < data.max_length:
            what = f"dataset_mixture: {path} was packed at {length} tokens ({mode or 'unknown'} mode), shorter than max_length={data.max_length}"
            if mode == "long":
                raise RecipeError(
                    f"{what}: its long documents were cut at {length} tokens, so the run would train at {length}, not "
                    f"{data.max_length}. Re-pack it with `prolong-data pack --mode long --length {data.max_length}`, "
                    f"or set max_length: {length}."
                )
            if path not in allowed:
                raise RecipeError(
                    f"{what}: its rows would train at {length} tokens. Re-pack it with `prolong-data pack --length "
                    f"{data.max_length}`, set max_length: {length}, or, if this short data is packed shorter on "
                    "purpose, list the path under allow_packed_shorter."
                )
        trained = max(trained, min(length, data.max_length))
        logger.info("Domain %s: packed at %d tokens (%s mode), trained at %d", path, length, mode or "unknown",
                    min(length, data.max_length))
    if trained < data.max_length:
        logger.warning("Every domain is packed shorter than max_length=%d: training at %d tokens per sequence.",
                       data.max_length, trained)
    logger.info("Training sequence length: %d tokens", trained)
    return trained


def main(argv: list[str] | None = None, callbacks: list | None = None) -> str:
    model_cfg, data_cfg, args, recipe = parse_recipe((ModelConfig, DataConfig, CPTConfig), argv, return_recipe=True)
    setup_logging(args)
    quiet_config_dumps()
    resolve_gradient_accumulation(args)
    check_master_weights(resolve_dtype(model_cfg.dtype), args, model_cfg.low_precision_master_weights)
    resume = resolve_resume(args, model_cfg, data_cfg, stage="continued-pretraining")  # before any loading
    if finished_run(args):
        return args.output_dir
    set_seed(args.seed)

    check_model_paths(model_cfg, args.init_from)
    train_dataset = build_train_dataset(data_cfg, args)  # before the model: bad data fails at once
    trained_length = check_packed_lengths(getattr(train_dataset, "dataset", train_dataset), data_cfg)
    log_mixture_summary(getattr(train_dataset, "dataset", train_dataset), data_cfg.dataset_mixture)

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
