"""The README.md model card written next to every trained model."""

from __future__ import annotations

import json
import os

import yaml


def _mixture_table(mixture: dict[str, float], tokens_by_path: dict[str, int]) -> str:
    rows = ["| dataset | share | tokens available |", "| --- | --- | --- |"]
    for path, share in mixture.items():
        rows.append(f"| `{path}` | {share:.0%} | {tokens_by_path.get(path, 0):,} |")
    return "\n".join(rows)


def dataset_tokens(path: str) -> int:
    meta = os.path.join(path, "prolong_data.json")
    if os.path.exists(meta):
        with open(meta) as f:
            return int(json.load(f).get("num_tokens", 0))
    return 0


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
) -> str:
    """Write ``output_dir/README.md``; returns its text."""
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
    evaluation = "No evaluation results yet (run `python -m evaluation.run --model THIS_DIR`)."
    recall = [entry for entry in (log_history or []) if any(k.startswith("eval_recall/") for k in entry)]
    if recall:  # written by evaluation.callback.RecallEvalCallback at each checkpoint
        rows = ["| step | task / length | score |", "| --- | --- | --- |"]
        rows += [
            f"| {entry.get('step', '')} | {key.removeprefix('eval_recall/')} | {value:.3f} |"
            for entry in recall[-1:]
            for key, value in entry.items()
            if key.startswith("eval_recall/")
        ]
        evaluation = "Recall evaluation at the last checkpoint (`eval_recall_lengths`):\n\n" + "\n".join(rows)
    front_matter = {"base_model": base_model, "library_name": "transformers", "tags": ["prolong", "long-context", stage]}
    text = f"""---
{yaml.safe_dump(front_matter, sort_keys=False).strip()}
---

# {name}

Trained with ProLong recipes (`{stage}` stage) from `{base_model}`.

## Context length and RoPE

- training sequence length: {max_length:,} tokens
- rope parameters: `{json.dumps(rope_parameters)}`

## Data mixture

{_mixture_table(mixture, {p: dataset_tokens(p) for p in mixture}) if mixture else "(see recipe)"}

## Training figures

{os.linesep.join(figures) if figures else "(none logged)"}

## Evaluation

{evaluation}

## Recipe

```yaml
{yaml.safe_dump(json.loads(json.dumps(recipe, default=str)), sort_keys=False).strip()}
```

Load it with `AutoModelForCausalLM.from_pretrained("{load_path}")`.
"""
    with open(os.path.join(output_dir, "README.md"), "w") as f:
        f.write(text)
    return text
