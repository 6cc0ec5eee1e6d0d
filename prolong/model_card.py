"""The README.md model card written next to every trained model (and pushed with it).

The YAML header is built with huggingface_hub's ModelCardData, so the Hub reads it: base_model,
datasets (the Hub ids of the mixture's domains, when they are on the Hub), pipeline_tag, tags and a
``model-index`` of EvalResults, one per HELMET category and length, when an evaluation ran (the
training callback's recall scores, or a full report added later with
``python -m evaluation.run ... --update-card MODEL_DIR``). No secret reaches the card: the recipe
copy goes through ``prolong.redaction.redact``.
"""

from __future__ import annotations

import json
import os

import yaml

from prolong.io.hub import looks_like_hub_id, parse_hf_dataset_address
from prolong.redaction import redact

EVALUATION_HEADING = "## Evaluation"
HELMET_DATASET = "princeton-nlp/HELMET"  # the Hub dataset of HELMET's benchmark data
HELMET_SOURCE = "HELMET-style evaluation (ProLong recipes, evaluation/)"
RULER_DATASET = "NVIDIA/RULER"  # RULER's generated benchmark (GitHub; no Hub dataset)


def _mixture_table(mixture: dict[str, float], tokens_by_path: dict[str, int]) -> str:
    rows = ["| dataset | share | tokens available |", "| --- | --- | --- |"]
    for path, share in mixture.items():
        rows.append(f"| `{path}` | {share:.0%} | {tokens_by_path.get(path, 0):,} |")
    return "\n".join(rows)


def dataset_tokens(path: str) -> int:
    from prolong.data.storage import METADATA_FILENAME

    meta = os.path.join(path, METADATA_FILENAME)
    if address := parse_hf_dataset_address(path):
        from huggingface_hub import try_to_load_from_cache  # the mixture downloaded it: no network here

        cached = address.config and try_to_load_from_cache(
            address.repo_id, f"{address.config}/{METADATA_FILENAME}", repo_type="dataset", revision=address.revision)
        meta = cached if isinstance(cached, str) else ""
    if os.path.exists(meta):
        with open(meta) as f:
            return int(json.load(f).get("num_tokens", 0))
    return 0


def hub_dataset_ids(mixture: dict[str, float] | None) -> list[str]:
    """Hub ids of the mixture's domains: a `hf://datasets/ORG/NAME/...` key, or a local directory
    `prolong-data push` has pushed (it records where, in prolong_hub.json)."""
    from prolong.data.hub import pushed_repo_id

    ids = []
    for path in mixture or {}:
        if address := parse_hf_dataset_address(path):
            ids.append(address.repo_id)
        elif repo_id := pushed_repo_id(path):
            ids.append(repo_id)
    return sorted(set(ids))


def _tokens(length) -> int:
    """A length key of scores.json ("8192"; "8k" as the evaluation configs write it) in tokens."""
    text = str(length).strip().lower()
    scale = {"k": 1024, "m": 1024**2}.get(text[-1:], 1)
    return int(float(text.rstrip("km")) * scale)


def _category_name(category: str) -> str:
    from evaluation.tasks import CATEGORY_FULL_NAMES  # evaluation owns the categories

    return CATEGORY_FULL_NAMES.get(category, category)


def _eval_result(category: str, length: int | str, score: float, mode: str):
    from huggingface_hub import EvalResult

    return EvalResult(
        task_type="text-generation",
        task_name="Long-context evaluation",
        dataset_type=HELMET_DATASET,
        # the Hub groups results by dataset (task, type, config, split): one per category, one metric per length
        dataset_name=f"HELMET {_category_name(category)}"
        + ("" if mode == "helmet" else f" ({mode} mode, not comparable with HELMET)"),
        dataset_config=category,
        dataset_split="test",
        dataset_args={"mode": mode},
        metric_type=f"helmet_{category}_{_tokens(length)}",
        metric_name=f"{_category_name(category)} @ {_tokens(length):,} tokens",
        metric_args={"input_length": _tokens(length)},
        metric_value=round(float(score), 2),
    )


def _ruler_result(length: int | str, average: float, tasks: int):
    """RULER's summary score at one length: the average of its tasks (`tasks` of RULER's 13 scored)."""
    from huggingface_hub import EvalResult

    return EvalResult(
        task_type="text-generation",
        task_name="Long-context evaluation",
        dataset_type=RULER_DATASET,
        dataset_name="RULER" + ("" if tasks == 13 else f" ({tasks} of 13 tasks)"),
        dataset_config="ruler",
        dataset_split="test",
        dataset_args={"tasks": tasks},
        metric_type=f"ruler_{_tokens(length)}",
        metric_name=f"RULER average @ {_tokens(length):,} tokens",
        metric_args={"input_length": _tokens(length)},
        metric_value=round(float(average), 2),
    )


def eval_results_from_scores(scores: dict) -> list:
    """One EvalResult per (category, length) of an evaluation/report.py scores.json; RULER's average per length
    under RULER's own dataset."""
    mode = scores.get("mode", "helmet")
    results = []
    for category, by_length in (scores.get("categories") or {}).items():
        for length, value in sorted(by_length.items(), key=lambda item: _tokens(item[0])):
            if value is None:
                continue
            if category == "ruler":
                tasks = (scores.get("ruler") or {}).get(str(length), {}).get("tasks", 13)
                results.append(_ruler_result(length, value, tasks))
            else:
                results.append(_eval_result(category, length, value, mode))
    return results


def eval_results_from_log_history(log_history: list[dict] | None) -> list:
    """The recall averages RecallEvalCallback logged at the last evaluated checkpoint (0-100 scores)."""
    recall = [entry for entry in (log_history or []) if any(k.startswith("eval_recall/") for k in entry)]
    if not recall:
        return []
    last = recall[-1]
    return [_eval_result("recall", key.removeprefix("eval_recall/avg_"), value, "helmet")
            for key, value in last.items() if key.startswith("eval_recall/avg_") and value is not None]


def _evaluation_section(eval_results: list, log_history: list[dict] | None, source: str) -> str:
    if not eval_results:
        return "No evaluation results yet (run `python -m evaluation.run --model THIS_DIR --update-card THIS_DIR`)."
    lengths = sorted({r.metric_args["input_length"] for r in eval_results})
    categories = list(dict.fromkeys(r.dataset_config for r in eval_results))
    score = {(r.dataset_config, r.metric_args["input_length"]): r.metric_value for r in eval_results}
    rows = ["| category | " + " | ".join(f"{n:,}" for n in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    for category in categories:
        cells = [f"{score[(category, n)]:.1f}" if (category, n) in score else "-" for n in lengths]
        rows.append(f"| {_category_name(category)} | " + " | ".join(cells) + " |")
    text = f"Scores (0-100) from {source}; they are in this card's `model-index` too.\n\n" + "\n".join(rows)
    recall = [entry for entry in (log_history or []) if any(k.startswith("eval_recall/") for k in entry)]
    if recall and log_history is not None:
        task_rows = ["| step | task / length | score |", "| --- | --- | --- |"]
        task_rows += [f"| {recall[-1].get('step', '')} | {key.removeprefix('eval_recall/')} | {value:.3f} |"
                      for key, value in recall[-1].items() if key.startswith("eval_recall/")]
        text = ("Recall evaluation at the last checkpoint (`eval_recall_lengths`):\n\n" + "\n".join(task_rows)
                + "\n\n" + text)
    return text


def _card_data(*, name: str, base_model: str, stage: str, mixture: dict | None, eval_results: list,
               recipe: dict | None = None):
    from huggingface_hub import ModelCardData

    dataset_ids = hub_dataset_ids(mixture)
    sft_dataset = str((recipe or {}).get("dataset_name") or "")  # SFT trains on one dataset, maybe a Hub id
    if looks_like_hub_id(sft_dataset) and not os.path.exists(sft_dataset):
        dataset_ids.append(sft_dataset)

    return ModelCardData(
        model_name=name,
        base_model=base_model if not os.path.isdir(base_model) else None,  # a local path is no Hub id
        datasets=sorted(set(dataset_ids)) or None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["prolong", "long-context", stage],
        eval_results=eval_results or None,
    )


def write_model_card(
    output_dir: str,
    *,
    name: str,
    load_path: str,
    base_model: str,
    stage: str,
    recipe: dict,
    rope_parameters: dict | None,
    max_length: int,
    mixture: dict[str, float] | None = None,
    log_history: list[dict] | None = None,
    scores: dict | None = None,
) -> str:
    """Write ``output_dir/README.md``; returns its text. ``scores``: an evaluation/report.py scores.json."""
    from huggingface_hub import ModelCard

    train_logs = [entry for entry in (log_history or []) if "loss" in entry]
    summary = [entry for entry in (log_history or []) if "train_runtime" in entry]
    figures = []
    if train_logs:
        last = train_logs[-1]
        figures.append(f"- final training loss: {last['loss']:.4f} at step {last.get('step')}")
        speeds = [e["tokens_per_second"] for e in train_logs if "tokens_per_second" in e]
        if speeds:
            figures.append(f"- median throughput: {sorted(speeds)[len(speeds) // 2]:,.0f} tokens/s")
    if summary:
        figures.append(f"- training time: {summary[-1]['train_runtime']:.0f} s")
    eval_results = eval_results_from_scores(scores) if scores else eval_results_from_log_history(log_history)
    if scores:
        source = HELMET_SOURCE
    else:
        recall = [e for e in (log_history or []) if any(k.startswith("eval_recall/") for k in e)]
        source = f"RecallEvalCallback at step {recall[-1].get('step')}" if recall else ""
    card_data = _card_data(name=name, base_model=base_model, stage=stage, mixture=mixture, eval_results=eval_results,
                           recipe=recipe)
    safe_recipe = redact(json.loads(json.dumps(recipe, default=str)))
    text = f"""---
{card_data.to_yaml()}
---

# {name}

Trained with ProLong recipes (`{stage}` stage) from `{redact(base_model)}`.

## Context length and RoPE

- training sequence length: {max_length:,} tokens
- rope parameters: `{json.dumps(rope_parameters)}`

## Data mixture

{_mixture_table(mixture, {p: dataset_tokens(p) for p in mixture}) if mixture else "(see recipe)"}

## Training figures

{os.linesep.join(figures) if figures else "(none logged)"}

{EVALUATION_HEADING}

{_evaluation_section(eval_results, None if scores else log_history, source)}

## Recipe

```yaml
{yaml.safe_dump(safe_recipe, sort_keys=False).strip()}
```

Load it with `AutoModelForCausalLM.from_pretrained("{load_path}")`.
"""
    text = redact(text)  # a secret held in the environment, wherever it was pasted
    ModelCard(text)  # parses the YAML header as the Hub will: fails here, not on the Hub
    _write_atomically(os.path.join(output_dir, "README.md"), text)
    return text


def check_updatable_card(model_dir: str) -> str:
    """The path of ``model_dir``'s card, or a clear error (before an evaluation runs for it)."""
    from huggingface_hub import ModelCard

    path = os.path.join(model_dir, "README.md")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--update-card: not found: {path} (the model card a ProLong run writes "
                                "into its output_dir); give the trained model's directory")
    try:
        ModelCard.load(path)
    except Exception as error:  # huggingface_hub raises several types for a bad YAML header
        raise ValueError(f"--update-card: {path} is not a readable model card ({type(error).__name__}: {error})") \
            from error
    return path


def update_model_card(model_dir: str, scores: dict) -> str:
    """Put an evaluation's scores into an existing card: the model-index (HELMET results replaced, and RULER's
    when the run has them; others kept) and the Evaluation section. Returns the new text."""
    from huggingface_hub import ModelCard

    path = check_updatable_card(model_dir)
    card = ModelCard.load(path)
    new_results = eval_results_from_scores(scores)
    if not new_results:
        raise ValueError("--update-card: the evaluation produced no category score to put in the card")
    replaced = {HELMET_DATASET} | {r.dataset_type for r in new_results}  # RULER's too when this run has them
    kept = [r for r in (card.data.eval_results or []) if r.dataset_type not in replaced]
    card.data.eval_results = kept + new_results
    if not card.data.model_name:
        card.data.model_name = os.path.basename(os.path.abspath(model_dir))
    section = _evaluation_section(new_results, None, HELMET_SOURCE)
    body = card.text  # after the YAML header (splitting content on "---" also split a name like run---2)
    if EVALUATION_HEADING in body:
        head, _, rest = body.partition(EVALUATION_HEADING)
        following = rest.find("\n## ")
        body = f"{head}{EVALUATION_HEADING}\n\n{section}\n{rest[following:] if following >= 0 else ''}"
    else:
        body = f"{body.rstrip()}\n\n{EVALUATION_HEADING}\n\n{section}\n"
    text = redact(f"---\n{card.data.to_yaml()}\n---\n\n{body.lstrip(chr(10))}")
    ModelCard(text)
    _write_atomically(path, text)
    return text


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_trainer_model_card(trainer, directory: str, *, base_model: str, stage: str, recipe: dict,
                             max_length: int, mixture: dict | None = None, load_path: str | None = None) -> str:
    """The card for ``directory`` from a live trainer (before each checkpoint push, and the final save)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    output_dir = trainer.args.output_dir
    return write_model_card(
        directory,
        name=os.path.basename(os.path.abspath(output_dir)),
        load_path=load_path or getattr(trainer, "hub_model_id", None) or output_dir,
        base_model=base_model,
        stage=stage,
        recipe=recipe,
        rope_parameters=model.config.get_text_config().rope_parameters,
        max_length=max_length,
        mixture=mixture,
        log_history=trainer.state.log_history,
    )
