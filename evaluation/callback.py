"""A TrainerCallback that runs a small recall evaluation on every saved checkpoint.

    trainer.add_callback(RecallEvalCallback(lengths=[8192, 32768], tasks=["json_kv"], num_samples=10))

On each save (rank 0 only) the in-memory model is put in eval mode, evaluated under no_grad, put back
in train mode; a training-only attention backend (varlen: no KV cache) is swapped for sdpa (eager for a
model sdpa cannot run) while it generates. The scores go to `<checkpoint>/recall_eval/` (scores.json,
report.md, predictions) and through `trainer.log` to log_history and every `report_to` backend
(TensorBoard, W&B, ...). Callbacks are not given the trainer, so attach it:

    RecallEvalCallback(lengths=[8192]).attach(trainer)   # = trainer.add_callback(cb); cb.trainer = trainer

Without a trainer the scores only reach `state.log_history` (a warning says so once).
"""
import logging
import os

from transformers import TrainerCallback

from .runner import evaluate

logger = logging.getLogger(__name__)

# attention implementations that generate with a KV cache; any other (varlen) is training-only
GENERATION_BACKENDS = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")


def generation_attn_implementation(model) -> str | None:
    """The backend to generate with when the model's own cannot (None: keep it)."""
    if model.config._attn_implementation in GENERATION_BACKENDS:
        return None
    softcap = getattr(model.config.get_text_config(), "attn_logit_softcapping", None)
    return "eager" if softcap or not getattr(model, "_supports_sdpa", True) else "sdpa"


class RecallEvalCallback(TrainerCallback):
    def __init__(self, lengths=(8192,), tasks=("json_kv", "ruler_mk_needle", "ruler_mk_uuid", "ruler_mv"),
                 num_samples: int = 10, **eval_kwargs):
        self.lengths = list(lengths)
        self.tasks = list(tasks)
        self.num_samples = num_samples
        self.eval_kwargs = {"plots": False, "num_depths": 5, "resume": False, **eval_kwargs}
        self.trainer = None  # set by attach(): callbacks are not handed the trainer
        self._warned = False

    def attach(self, trainer):
        """Add this callback to `trainer` and log through it (so scores reach its report_to backends)."""
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self.trainer = trainer
        return self

    def on_save(self, args, state, control, model=None, processing_class=None, tokenizer=None, **kwargs):
        if not state.is_world_process_zero or model is None:
            return control
        tokenizer = processing_class or tokenizer
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        out_dir = os.path.join(checkpoint if os.path.isdir(checkpoint) else args.output_dir,
                               "recall_eval" if os.path.isdir(checkpoint) else f"recall_eval-{state.global_step}")
        was_training, training_attn = model.training, model.config._attn_implementation
        generation_attn = generation_attn_implementation(model)
        model.eval()
        try:
            if generation_attn:
                model.set_attn_implementation(generation_attn)
            scores = evaluate(model, tokenizer=tokenizer, tasks=self.tasks, lengths=self.lengths, output_dir=out_dir,
                              max_samples=self.num_samples, **self.eval_kwargs)
        finally:
            if generation_attn:
                model.set_attn_implementation(training_attn)
            if was_training:
                model.train()
        logs = {f"eval_recall/{r['task']}_{r['length']}": r["score"] for r in scores["results"] if r["score"] is not None}
        for length, value in scores["categories"].get("recall", {}).items():
            logs[f"eval_recall/avg_{length}"] = value
        if self.trainer is not None:
            self.trainer.log(dict(logs))  # appends {..., "step"} to log_history and calls every on_log
        else:
            if not self._warned:
                self._warned = True
                logger.warning("RecallEvalCallback has no trainer (use .attach(trainer)): scores go to "
                               "log_history only, not to the report_to backends")
            state.log_history.append({**logs, "step": state.global_step})
        logger.info("recall eval at step %d: %s", state.global_step, logs)
        return control
