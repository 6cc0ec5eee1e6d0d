"""The evaluation loop: tasks x lengths x samples -> per-sample jsonl, scores, report and plots.

Every sample is appended to `predictions/<task>_<length>.jsonl` as soon as it completes, so an
interrupted run keeps its work and a rerun (resume=True) skips the ids already there.
"""
import json
import logging
import os
import time

import torch

from . import report
from .config import load_config
from .generation import HFGenerator, PromptBuilder, VLLMGenerator, model_window
from .judge import Judge
from .tasks import LoadRequest, get_task

logger = logging.getLogger(__name__)


def _read_done(path: str) -> dict:
    """Completed records by id; a line cut by an interruption is ignored (and redone)."""
    done = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                done[record["id"]] = record
    return done


def _rewrite_clean(path: str, records: dict):
    """Drop a torn last line before appending, so the file stays valid jsonl."""
    if records and os.path.exists(path):
        with open(path, "w", encoding="utf-8") as f:
            for record in records.values():
                f.write(json.dumps(record) + "\n")


def _setting(cfg: dict, key: str, task_default):
    return task_default if cfg.get(key) is None else cfg[key]


def _make_generator(model_or_path, tokenizer, cfg):
    from transformers import AutoTokenizer
    if isinstance(model_or_path, str):
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(cfg.get("tokenizer") or model_or_path)
        if cfg["backend"] == "vllm":
            generator = VLLMGenerator(model_or_path, tokenizer, max_model_len=max(cfg["lengths"]))
            from transformers import AutoConfig
            return generator, tokenizer, getattr(AutoConfig.from_pretrained(model_or_path), "max_position_embeddings", None)
        generator = HFGenerator.from_pretrained(model_or_path, tokenizer, attn_implementation=cfg["attn_implementation"],
                                                prefill_chunk_size=cfg["prefill_chunk_size"])
        return generator, tokenizer, model_window(generator.model)
    if tokenizer is None:
        raise ValueError("evaluate() with an in-memory model needs its tokenizer")
    return HFGenerator(model_or_path, tokenizer, prefill_chunk_size=cfg["prefill_chunk_size"]), tokenizer, model_window(model_or_path)


def run_task_length(task, length: int, cfg: dict, generator, builder: PromptBuilder, judge, window) -> dict:
    """Evaluate one task at one length; returns its summary (also when skipped)."""
    gen_len = _setting(cfg, "generation_max_length", task.generation_max_length)
    summary = {"task": task.name, "category": task.category, "length": length}
    if window is not None and length > window and not cfg["allow_beyond_window"]:
        message = (f"length {length} exceeds the model window (max_position_embeddings={window}); not run. "
                   "Set allow_beyond_window=true to run it anyway (e.g. RoPE-scaled models).")
        logger.warning("%s: %s", task.name, message)
        return {**summary, "status": "beyond_window", "message": message, "score": None, "n": 0}
    use_chat = _setting(cfg, "use_chat_template", task.use_chat_template)
    stop_newline = _setting(cfg, "stop_newline", task.stop_newline)
    request = LoadRequest(length=length, input_budget=length - gen_len,
                          max_samples=_setting(cfg, "max_samples", task.default_max_samples), seed=cfg["seed"],
                          shots=_setting(cfg, "shots", task.shots), data_dir=cfg["data_dir"],
                          num_depths=cfg["num_depths"], count_tokens=builder.count(task, use_chat))
    samples = task.load(task, request)

    path = os.path.join(cfg["output_dir"], "predictions", f"{task.name}_{length}.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    done = _read_done(path) if cfg["resume"] else {}
    _rewrite_clean(path, done)
    with open(path, "a" if cfg["resume"] else "w", encoding="utf-8") as out:
        for sample in samples:
            if sample["id"] in done:
                continue
            input_ids, cut = builder.truncated_ids(task, sample, use_chat, request.input_budget)
            start = time.time()
            output = generator.generate(input_ids, gen_len, stop_newline)
            metrics = task.score(output, sample)
            if task.judged:
                metrics.update(judge.score(task, output, sample) if judge else {"judge": "skipped: no judge configured"})
            record = {"id": sample["id"], "task": task.name, "length": length, "input_tokens": len(input_ids),
                      "truncated_tokens": cut, "depth": sample.get("depth"), "output": output,
                      "answer": sample["answer"], "metrics": metrics, "seconds": round(time.time() - start, 3)}
            out.write(json.dumps(record) + "\n")
            out.flush()  # written as each sample completes
            done[sample["id"]] = record
    records = [done[s["id"]] for s in samples if s["id"] in done]
    return {**summary, **report.summarise(task, records), "status": "ok", "use_chat_template": use_chat,
            "stop_newline": stop_newline, "generation_max_length": gen_len}


def evaluate(model_or_path, tokenizer=None, tasks=None, lengths=None, output_dir=None, config: str | None = None,
             **overrides) -> dict:
    """Run the evaluation and write predictions, scores.json, report.md and plots into output_dir.

    `model_or_path`: a model path (loaded in bf16 on GPU, fp32 on CPU) or an in-memory causal LM
    (then pass its tokenizer). Any config key (see config.DEFAULTS) can be passed as a keyword."""
    given = {k: v for k, v in dict(tasks=tasks, lengths=lengths, output_dir=output_dir, **overrides).items() if v is not None}
    cfg = load_config(config, given)
    task_objects = [get_task(name) for name in cfg["tasks"]]  # unknown names fail before any work
    generator, tokenizer, window = _make_generator(model_or_path, tokenizer, cfg)
    builder = PromptBuilder(tokenizer)
    judge = Judge.from_config(cfg)
    os.makedirs(cfg["output_dir"], exist_ok=True)

    results = []
    with torch.no_grad():
        for task in task_objects:
            for length in cfg["lengths"]:
                logger.info("evaluating %s at %d tokens", task.name, length)
                results.append(run_task_length(task, length, cfg, generator, builder, judge, window))
    model_name = model_or_path if isinstance(model_or_path, str) else getattr(model_or_path.config, "_name_or_path", "in-memory model")
    scores = report.build_scores(results, model_name=model_name, config=cfg, window=window)
    report.write_all(scores, cfg["output_dir"], plots=cfg["plots"])
    return scores
