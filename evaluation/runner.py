"""The evaluation loop: tasks x lengths x samples -> per-sample jsonl, scores, report and plots.

Order of work, so that nothing is lost and nothing is mixed:
1. every task's data is checked (all missing files listed in one message) and every predictions file
   already in output_dir is checked against this run's identity (identity.py), before the model loads;
2. each sample is appended to `predictions/<task>_<length>.jsonl` as soon as it completes, so an
   interrupted run keeps its work and a rerun (resume=True) skips the samples already there;
3. a task that fails is reported as failed and the others still run;
4. scores.json, report.md and the plots cover every (task, length) of this run found in output_dir.
"""
import glob
import json
import logging
import os
import time

import torch
from tqdm.auto import tqdm

from prolong.redaction import mask_secrets

from . import identity, report
from .config import load_config
from .generation import HFGenerator, PromptBuilder, VLLMGenerator
from .tasks.cite import CitationScorer
from .judge import Judge
from .tasks import DataFileMissing, LoadRequest, get_task
from .tasks.recall import released_file

logger = logging.getLogger(__name__)

PROMPT_EDGE_CHARS = 300  # head and tail of the prompt kept in each record unless save_prompts is on


class EvaluationError(ValueError):
    """A run that cannot start or continue as asked; the message names the cause and the fix."""


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


def _rewrite(path: str, records: dict):
    """Rewrite the jsonl from `records` (drops a torn last line; keeps re-judged records)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records.values():
            f.write(json.dumps(mask_secrets(record)) + "\n")
    os.replace(tmp, path)


def _setting(cfg: dict, key: str, task_default):
    return task_default if cfg.get(key) is None else cfg[key]


def resolved_settings(task, cfg: dict) -> dict:
    """The per-task settings after applying the task's (HELMET) defaults for null config keys."""
    return {"generation_max_length": _setting(cfg, "generation_max_length", task.generation_max_length),
            "use_chat_template": _setting(cfg, "use_chat_template", task.use_chat_template),
            "stop_newline": _setting(cfg, "stop_newline", task.default_stop_newline(cfg.get("mode", "helmet"))),
            "max_samples": _setting(cfg, "max_samples", task.default_max_samples),
            "shots": _setting(cfg, "shots", task.shots)}


def _load_request(task, length: int, cfg: dict, settings: dict, count_tokens, max_samples=None,
                  tokenizer=None) -> LoadRequest:
    fields = dict(length=length, input_budget=length - settings["generation_max_length"],
                  max_samples=max_samples or settings["max_samples"], seed=cfg["seed"], shots=settings["shots"],
                  data_dir=cfg["data_dir"], num_depths=cfg["num_depths"], count_tokens=count_tokens)
    for key in ("mode", "length_tokenizer"):
        if cfg.get(key) is not None:
            fields[key] = cfg[key]
    fields.setdefault("length_tokenizer", tokenizer)  # HELMET's document measures: the model's tokenizer by default
    return LoadRequest(**fields)


def _paths(cfg: dict, task_name: str, length: int) -> tuple[str, str]:
    stem = os.path.join(cfg["output_dir"], "predictions", f"{task_name}_{length}")
    return stem + ".jsonl", stem + ".run.json"


# ---------------------------------------------------------------------------------------------
# before the model loads

def _load_tokenizer(model_or_path, tokenizer, cfg):
    if tokenizer is not None:
        return tokenizer
    if not isinstance(model_or_path, str) and not cfg.get("tokenizer"):
        raise EvaluationError("evaluate() with an in-memory model needs its tokenizer (tokenizer=...)")
    from prolong.io.tokenizer import load_tokenizer

    return load_tokenizer(cfg.get("tokenizer") or model_or_path, field="tokenizer" if cfg.get("tokenizer") else "model",
                          hint="Pass --model (and --tokenizer) pointing at a folder saved with save_pretrained.")


def _model_config(model_or_path):
    if not isinstance(model_or_path, str):
        return model_or_path.config
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(model_or_path)


def run_identity(model_or_path, tokenizer, cfg: dict) -> dict:
    """Fields shared by every predictions file of this run (see identity.RUN_FIELDS)."""
    if isinstance(model_or_path, str):
        name = os.path.abspath(model_or_path) if os.path.isdir(model_or_path) else model_or_path
        fingerprint = identity.model_dir_fingerprint(model_or_path) if os.path.isdir(model_or_path) else None
        dtype = "bfloat16" if torch.cuda.is_available() and cfg["backend"] == "hf" else (
            "bfloat16" if cfg["backend"] == "vllm" else "float32")
    else:
        name = getattr(model_or_path.config, "_name_or_path", "") or "in-memory model"
        fingerprint = identity.model_object_fingerprint(model_or_path)
        dtype = str(next(model_or_path.parameters()).dtype).replace("torch.", "")
    return {"model": name, "model_fingerprint": fingerprint, "tokenizer_fingerprint": identity.tokenizer_fingerprint(tokenizer),
            "mode": cfg.get("mode", "helmet"), "backend": cfg["backend"], "dtype": dtype,
            "attn_implementation": cfg["attn_implementation"]}


# config keys that change neither a prompt nor a score (or enter the identity another way: the run
# fields, the resolved per-task settings, data_dir, the scorers named per record); every other key,
# including keys added later, is part of a predictions file's identity
_KEYS_OUTSIDE_IDENTITY = {"tasks", "lengths", "model", "tokenizer", "output_dir", "resume", "plots", "progress",
                          "save_prompts", "prefill_chunk_size", "allow_beyond_window", "judge_base_url", "judge_model",
                          "judge_api_key_env", "nli_model", "data_dir", "mode", "backend", "attn_implementation",
                          "max_samples", "shots", "use_chat_template", "stop_newline", "generation_max_length"}


def _json_safe(value):
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "get_vocab"):  # a tokenizer object (e.g. length_tokenizer through the Python API)
        return "tokenizer:" + identity.tokenizer_fingerprint(value)
    return type(value).__name__


def task_identity(run: dict, task, length: int, cfg: dict, settings: dict) -> dict:
    """Everything that changes a prompt or a score of (task, length). Model-scored metrics (judge,
    citation NLI) are not in it: each record names its scorer and is scored again when it changes."""
    others = {k: _json_safe(v) for k, v in sorted(cfg.items()) if k not in _KEYS_OUTSIDE_IDENTITY}
    # a generated task reads HELMET's file instead once the data directory has it: another run's samples
    released = released_file(task, cfg.get("mode", "helmet"), cfg["data_dir"], length)
    return {**run, "task": task.name, "length": length, **others,
            "data_dir": os.path.abspath(cfg["data_dir"]) if not task.extra.get("builder") else None, **settings,
            **({"data_file": released} if released else {})}


def runnable_lengths(cfg: dict, window) -> list[int]:
    """The lengths this run builds prompts for: those within the model window unless allow_beyond_window."""
    return [n for n in cfg["lengths"] if window is None or n <= window or cfg["allow_beyond_window"]]


def check_window(cfg: dict, window) -> None:
    """Some length must fit the model window (or allow_beyond_window): else nothing would run."""
    if not runnable_lengths(cfg, window):
        raise EvaluationError(
            f"lengths: every length ({', '.join(map(str, cfg['lengths']))}) exceeds the model window "
            f"(max_position_embeddings={window}); nothing was run. Give lengths up to {window}, or set "
            "allow_beyond_window=true for a model that runs beyond it (e.g. RoPE-scaled).")


def check_prompt_room(task_objects, cfg: dict, window) -> None:
    """Each length that runs must leave room for the prompt after each task's generation budget
    (HELMET's length = input + generation)."""
    short = []
    for task in task_objects:
        generation = resolved_settings(task, cfg)["generation_max_length"]
        short += [f"{length} for {task.name} (generation_max_length {generation})"
                  for length in runnable_lengths(cfg, window) if length <= generation]
    if short:
        raise EvaluationError(f"lengths: {'; '.join(short)} leave no room for the prompt: a length is the input plus "
                              "the generated tokens. Give larger lengths (e.g. 8k) or a smaller generation_max_length.")


def check_data(task_objects, cfg: dict, builder: PromptBuilder, window=None) -> None:
    """Load every (task, length) once, with a cheap token estimate, so that every missing data file is
    found before the model loads; raises one DataFileMissing listing them all."""
    missing = []
    for task in task_objects:
        settings = resolved_settings(task, cfg)
        # generated tasks read no file and RULER's read the same files at every length (its size search is
        # costly at 128K): their prompts are built only for lengths that will run
        same_files = task.extra.get("builder") or task.extra.get("ruler_task")
        for length in runnable_lengths(cfg, window) if same_files else cfg["lengths"]:
            estimate = lambda sample: sum(len(str(v)) for v in sample.values()) // 4  # noqa: E731 (chars/4)
            try:
                task.load(task, _load_request(task, length, cfg, settings, estimate, max_samples=1,
                                              tokenizer=builder.tokenizer))
            except DataFileMissing as error:
                if str(error) not in missing:
                    missing.append(str(error))
            except Exception as error:  # noqa: BLE001 - real errors surface again (with the real counts) at run time
                logger.debug("data check of %s at %d: %s", task.name, length, error)
    if missing:
        raise DataFileMissing(f"data missing for {len(missing)} task(s); nothing was run:\n" +
                              "\n".join(f"- {m}" for m in missing))


def check_resume(task_objects, cfg: dict, run: dict) -> None:
    """With resume on, refuse any predictions file of a (task, length) to be run that another run wrote."""
    if not cfg["resume"]:
        return
    problems = []
    for task in task_objects:
        settings = resolved_settings(task, cfg)
        for length in cfg["lengths"]:
            jsonl, meta = _paths(cfg, task.name, length)
            if not os.path.exists(jsonl) or os.path.getsize(jsonl) == 0:
                continue
            if not os.path.exists(meta):
                problems.append(f"- {jsonl}: no {os.path.basename(meta)} beside it (written by an older version or "
                                "another tool), so what made it is unknown")
                continue
            try:
                with open(meta) as f:
                    saved = json.load(f).get("identity", {})
            except (OSError, ValueError) as error:
                problems.append(f"- {meta}: unreadable ({error}), so what made {os.path.basename(jsonl)} is unknown")
                continue
            current = task_identity(run, task, length, cfg, settings)
            if current.get("model_fingerprint") is None:  # a Hub id: compared again once loaded
                current = {**current, "model_fingerprint": saved.get("model_fingerprint")}
            diff = identity.differences(saved, current)
            if diff:
                problems.append(f"- {jsonl} was written by another run:\n    " + "\n    ".join(diff))
    if problems:
        raise EvaluationError(
            f"output_dir {cfg['output_dir']} holds predictions that this run must not reuse:\n" + "\n".join(problems)
            + "\nUse another output_dir, or pass resume=false (--resume false) to replace these predictions.")


# ---------------------------------------------------------------------------------------------
# the model and one (task, length)

def _make_generator(model_or_path, tokenizer, cfg):
    if isinstance(model_or_path, str):
        if cfg["backend"] == "vllm":
            return VLLMGenerator(model_or_path, tokenizer, max_model_len=max(cfg["lengths"]))
        return HFGenerator.from_pretrained(model_or_path, tokenizer, attn_implementation=cfg["attn_implementation"],
                                           prefill_chunk_size=cfg["prefill_chunk_size"])
    return HFGenerator(model_or_path, tokenizer, prefill_chunk_size=cfg["prefill_chunk_size"])


def _model_scorer(task):
    """(metrics key, record key naming the scorer, why it may be absent) of a model-scored task."""
    if task.category == "cite":
        return "citation", "nli_model", "no nli_model configured"
    if task.judged:
        return "judge", "judge_model", "no judge configured"
    return None


def _model_scores(task, output: str, sample: dict, scorers: dict) -> dict:
    """Model-scored metrics of one sample (LLM judge, citation NLI); a failing scorer marks the sample,
    never the run, and the output is kept, to be scored again on resume."""
    spec = _model_scorer(task)
    if spec is None:
        return {}
    key, name_key, missing = spec
    scorer = scorers.get(key)
    if scorer is None:
        return {key: f"skipped: {missing}"}
    try:
        scores = scorer.score(task, output, sample)
    except Exception as error:  # noqa: BLE001 - URLError, timeouts, bad replies: this sample only
        logger.warning("%s %s: %s failed: %s", task.name, sample.get("id"), key, error)
        scores = {key: f"failed: {type(error).__name__}: {error}", f"{key}_failed": 1}
    return {**scores, name_key: scorer.name}


def _rescore(task, record: dict, sample: dict, scorers: dict) -> None:
    """Score a kept output again when its scorer failed, was absent or changed (no regeneration)."""
    spec = _model_scorer(task)
    if spec is None or scorers.get(spec[0]) is None:
        return
    key, name_key, _ = spec
    metrics = record["metrics"]
    if metrics.get(name_key) == scorers[key].name and not str(metrics.get(key, "")).startswith(("failed", "skipped")):
        return
    kept = {k: v for k, v in metrics.items() if not k.startswith(key) and k != name_key}
    record["metrics"] = {**kept, **_model_scores(task, record["output"], sample, scorers)}


def _prompt_fields(tokenizer, input_ids: list[int], save_prompts: bool) -> dict:
    text = tokenizer.decode(input_ids, skip_special_tokens=False)  # the model's exact input, as text
    fields = {"prompt_sha256": identity.ids_hash(input_ids)}
    if save_prompts:
        fields["prompt"] = text
    else:
        fields["prompt_head"] = text[:PROMPT_EDGE_CHARS]
        fields["prompt_tail"] = text[-PROMPT_EDGE_CHARS:] if len(text) > PROMPT_EDGE_CHARS else ""
    return fields


def _beyond_window(task_name: str, length: int, window: int, summary: dict, meta: str, this_identity: dict) -> dict:
    message = (f"length {length} exceeds the model window (max_position_embeddings={window}); not run. "
               "Set allow_beyond_window=true to run it anyway (e.g. RoPE-scaled models).")
    logger.warning("%s: %s", task_name, message)
    result = {**summary, "status": "beyond_window", "message": message, "score": None, "n": 0}
    identity.write_json_atomic(meta, {"identity": this_identity, "summary": result})
    return result


def _check_kept_prompts(jsonl: str, samples: list, done: dict, prompt_ids) -> None:
    """Kept outputs must come from the prompt this run builds (compared by hash: the ids of 100 x 128K
    prompts are not kept)."""
    for sample in samples:
        old = done.get(sample["id"])
        if old is not None and old.get("prompt_sha256") != identity.ids_hash(prompt_ids(sample)[0]):
            raise EvaluationError(f"{jsonl}: sample {sample['id']} was made from another prompt than this run builds "
                                  "(data, tokenizer or prompt settings changed). Use another output_dir or resume=false.")


def run_task_length(task, length: int, cfg: dict, generator, builder: PromptBuilder, scorers: dict, window,
                    run: dict) -> dict:
    """Evaluate one task at one length; returns its summary (also when skipped)."""
    settings = resolved_settings(task, cfg)
    gen_len, use_chat, stop_newline = settings["generation_max_length"], settings["use_chat_template"], settings["stop_newline"]
    summary = {"task": task.name, "category": task.category, "length": length}
    jsonl, meta = _paths(cfg, task.name, length)
    os.makedirs(os.path.dirname(jsonl), exist_ok=True)
    this_identity = task_identity(run, task, length, cfg, settings)
    if window is not None and length > window and not cfg["allow_beyond_window"]:
        return _beyond_window(task.name, length, window, summary, meta, this_identity)
    request = _load_request(task, length, cfg, settings, builder.count(task, use_chat), tokenizer=builder.tokenizer)
    samples = task.load(task, request)

    done = _read_done(jsonl) if cfg["resume"] else {}

    def prompt_ids(sample):
        return builder.truncated_ids(task, sample, use_chat, request.input_budget, mode=request.mode)

    _check_kept_prompts(jsonl, samples, done, prompt_ids)
    identity.write_json_atomic(meta, {"identity": this_identity, "summary": None})  # claims the file
    if done:
        for sample in samples:
            if sample["id"] in done:
                _rescore(task, done[sample["id"]], sample, scorers)
    _rewrite(jsonl, done)  # also drops a torn last line, and starts the file afresh without resume

    todo = [s for s in samples if s["id"] not in done]
    tokens, seconds = 0, 0.0
    bar = tqdm(total=len(samples), initial=len(samples) - len(todo), desc=f"{task.name} @ {length}", unit="sample",
               disable=not cfg.get("progress", True), dynamic_ncols=True)
    with open(jsonl, "a", encoding="utf-8") as out, bar:
        for sample in todo:
            input_ids, cut = prompt_ids(sample)
            start = time.time()
            output = generator.generate(input_ids, gen_len, stop_newline)
            elapsed = time.time() - start
            scored = task.score_output(output, sample, use_chat, request.mode)
            metrics = {**scored, **_model_scores(task, output, sample, scorers)}
            record = {"id": sample["id"], "task": task.name, "length": length, "input_tokens": len(input_ids),
                      "truncated_tokens": cut, "depth": sample.get("depth"), "output": output,
                      "answer": sample["answer"], "metrics": metrics, "seconds": round(elapsed, 3),
                      **_prompt_fields(builder.tokenizer, input_ids, cfg.get("save_prompts", False))}
            out.write(json.dumps(mask_secrets(record)) + "\n")
            out.flush()  # written as each sample completes
            done[sample["id"]] = record
            tokens += len(input_ids) + len(builder.tokenizer(output, add_special_tokens=False)["input_ids"])
            seconds += elapsed
            bar.set_postfix_str(f"{tokens / max(seconds, 1e-9):,.0f} tok/s", refresh=False)
            bar.update(1)
    records = [done[s["id"]] for s in samples if s["id"] in done]
    result = {**summary, **report.summarise(task, records), "status": "ok", "use_chat_template": use_chat,
              "stop_newline": stop_newline, "generation_max_length": gen_len}
    identity.write_json_atomic(meta, {"identity": this_identity, "summary": result})
    return result


def _settings_differences(cfg: dict, run: dict, summary: dict, saved: dict) -> list[str]:
    """Per-task settings (max_samples, shots, seed, ...) of an earlier invocation's (task, length) that
    differ from this invocation's, for a task this invocation runs too."""
    if summary["task"] not in cfg["tasks"]:
        return []
    task = get_task(summary["task"])
    current = task_identity(run, task, summary["length"], cfg, resolved_settings(task, cfg))
    fields = [k for k in sorted(set(current) | set(saved)) if k not in identity.RUN_FIELDS]
    return identity.differences(saved, current, fields)


def collect_results(cfg: dict, run: dict, current: list) -> tuple[list, list]:
    """This invocation's results plus those of earlier invocations of the same run (same model,
    tokenizer, mode...) found in output_dir; returns (results, notes about files left out)."""
    by_key = {}
    left_out = []
    for meta in sorted(glob.glob(os.path.join(cfg["output_dir"], "predictions", "*.run.json"))):
        try:
            with open(meta) as f:
                saved = json.load(f)
        except (OSError, ValueError) as error:
            left_out.append(f"{os.path.basename(meta)[:-len('.run.json')]}: unreadable {meta} ({error})")
            continue
        if not saved.get("summary"):
            continue
        diff = identity.differences(saved.get("identity", {}), run, identity.RUN_FIELDS)
        if diff:
            left_out.append(f"{os.path.basename(meta)[:-len('.run.json')]}: another run ({'; '.join(diff)})")
            continue
        summary = saved["summary"]
        other = _settings_differences(cfg, run, summary, saved.get("identity", {}))
        if other:  # same model, but not what this invocation would run: reported, with a note saying so
            summary = {**summary, "note": "; ".join(filter(None, [summary.get("note"), "from an earlier invocation "
                                                                   f"with other settings ({'; '.join(other)})"]))}
        by_key[(summary["task"], summary["length"])] = summary
    for result in current:
        by_key[(result["task"], result["length"])] = result
    from .tasks import TASKS
    order = {name: i for i, name in enumerate(TASKS)}
    results = [by_key[k] for k in sorted(by_key, key=lambda k: (order.get(k[0], len(order)), k[0], k[1]))]
    return results, left_out


def evaluate(model_or_path, tokenizer=None, tasks=None, lengths=None, output_dir=None, config: str | None = None,
             **overrides) -> dict:
    """Run the evaluation and write predictions, scores.json, report.md and plots into output_dir.

    `model_or_path`: a model path (loaded in bf16 on GPU, fp32 on CPU) or an in-memory causal LM
    (then pass its tokenizer). Any config key (see config.EvalSettings) can be passed as a keyword."""
    if isinstance(tokenizer, str):  # a tokenizer path (the `tokenizer` config key, e.g. evaluation.run --tokenizer)
        tokenizer, overrides = None, {**overrides, "tokenizer": tokenizer}
    given = {k: v for k, v in dict(tasks=tasks, lengths=lengths, output_dir=output_dir, **overrides).items() if v is not None}
    cfg = load_config(config, given)
    try:
        task_objects = [get_task(name) for name in cfg["tasks"]]  # unknown names fail before any work
    except KeyError as error:
        raise EvaluationError(error.args[0]) from None
    # the judge's key is checked (and registered for redaction) before anything is loaded or generated
    judge = Judge.from_config(cfg) if any(t.judged for t in task_objects) else None
    tokenizer = _load_tokenizer(model_or_path, tokenizer, cfg)
    window = getattr(_model_config(model_or_path), "max_position_embeddings", None)
    check_prompt_room(task_objects, cfg, window)
    builder = PromptBuilder(tokenizer)
    check_data(task_objects, cfg, builder, window)  # every missing file listed, before the window refusal
    run = run_identity(model_or_path, tokenizer, cfg)
    check_resume(task_objects, cfg, run)
    scorers = {"judge": judge,  # the citation NLI model loads only for Cite tasks
               "citation": CitationScorer.from_config(cfg) if any(t.category == "cite" for t in task_objects) else None}
    check_window(cfg, window)  # after every setting's own refusal, before anything is written
    os.makedirs(cfg["output_dir"], exist_ok=True)
    generator = _make_generator(model_or_path, tokenizer, cfg)
    if run["model_fingerprint"] is None and hasattr(generator, "model"):  # a Hub id: fingerprint what was loaded
        run["model_fingerprint"] = identity.model_object_fingerprint(generator.model)
        check_resume(task_objects, cfg, run)

    current = []
    with torch.no_grad():
        for task in task_objects:
            for length in cfg["lengths"]:
                logger.info("evaluating %s at %d tokens", task.name, length)
                try:
                    current.append(run_task_length(task, length, cfg, generator, builder, scorers, window, run))
                except Exception as error:  # one task's failure must not lose the others' report
                    if isinstance(error, EvaluationError):  # a refusal: its message says it all
                        logger.error("%s at %d not run: %s", task.name, length, error)
                    else:
                        logger.exception("%s at %d failed", task.name, length)
                    current.append({"task": task.name, "category": task.category, "length": length, "status": "failed",
                                    "message": f"failed: {type(error).__name__}: {error}", "score": None, "n": 0})
    results, left_out = collect_results(cfg, run, current)
    scores = report.build_scores(results, model_name=run["model"], config=cfg, window=window, identity=run,
                                 left_out=left_out)
    return report.write_all(scores, cfg["output_dir"], plots=cfg["plots"])
