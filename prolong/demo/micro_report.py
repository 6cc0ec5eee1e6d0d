"""Micro-ProLong's before/after table: recall at the native window and at 4x (from `evaluation`),
held-out short-text loss, written as markdown, JSON and a PNG (also appended to model cards)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from prolong.demo.micro_data import MICRO_FACTOR, MICRO_WINDOW, RECALL_TASK


def packed_loss(model_dir: str, packed_dir: str, max_rows: int = 64) -> float:
    """Mean token cross-entropy of a model on packed documents, e.g. held-out short ones (document-masked rows,
    the first token of each document not scored, as in training)."""
    import datasets as hf_datasets
    import torch
    from transformers import AutoModelForCausalLM

    from prolong.training.collator import NOT_MODEL_INPUTS, PackedCollator

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    rows = hf_datasets.load_from_disk(packed_dir)
    torch.set_grad_enabled(False)
    total, count = 0.0, 0
    collate = PackedCollator()
    for start in range(0, min(len(rows), max_rows), 8):
        batch = collate([rows[i] for i in range(start, min(start + 8, len(rows), max_rows))])
        inputs = {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS and torch.is_tensor(v)}
        logits = model(**inputs, use_cache=False).logits.float()
        labels = batch["labels"]
        shifted = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                    ignore_index=-100, reduction="sum")
        total += shifted.item()
        count += int((labels[:, 1:] != -100).sum())
    torch.set_grad_enabled(True)
    return total / count


def recall_scores(model_dir: str, out_dir: str, window: int, factor: int, samples: int) -> dict[int, float]:
    """Recall (%) at the native window and at factor x window, from our evaluation package."""
    from evaluation.runner import evaluate

    lengths = [window, window * factor]
    scores = evaluate(model_dir, tasks=[RECALL_TASK], lengths=lengths, output_dir=out_dir, max_samples=samples,
                      generation_max_length=12, allow_beyond_window=True, resume=False, plots=False)
    return {r["length"]: r["score"] for r in scores["results"]}


def plot_recall_and_loss(names: list[str], native: list[float], extended: list[float], losses: list[float],
                         window: int, factor: int, path: Path) -> None:
    """Recall bars at the native window and at factor x window beside held-out short-text loss bars, one
    group per run (the micro report's stages, benchmarks/ablations.py's variants)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    xs = range(len(names))
    left.bar([x - 0.2 for x in xs], native, width=0.4, label=f"{window} (native)")
    left.bar([x + 0.2 for x in xs], extended, width=0.4, label=f"{window * factor} ({factor}x)")
    left.set_xticks(list(xs), names, rotation=15)
    left.set_ylabel("recall (%)")
    left.set_ylim(0, 118)  # room above the bars for the legend
    left.legend(loc="upper center", ncol=2, fontsize=8)
    right.bar(list(xs), losses, color="gray")
    right.set_xticks(list(xs), names, rotation=15)
    right.set_ylabel("held-out short-text loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def micro_report(models: dict[str, str], data_dir: str, out_dir: str, *, window: int = MICRO_WINDOW,
                 factor: int = MICRO_FACTOR, samples: int = 20, cards: list[str] = ()) -> str:
    """Evaluate each stage, print the before/after table, write it as markdown + PNG, and append it
    to the model cards in `cards`."""
    rows = []
    for stage, path in models.items():
        recall = recall_scores(path, str(Path(out_dir) / "eval" / stage), window, factor, samples)
        loss = packed_loss(path, str(Path(data_dir) / f"heldout-short-{window}"))
        rows.append({"stage": stage, "model": path, f"recall@{window}": recall[window],
                     f"recall@{window * factor}": recall[window * factor], "short_loss": loss})
    base_loss = rows[0]["short_loss"]
    header = (f"| stage | recall @ {window} (native) | recall @ {window * factor} (4x) | held-out short-text loss | vs base |\n"
              "| --- | --- | --- | --- | --- |\n")
    table = header + "".join(
        f"| {r['stage']} | {r[f'recall@{window}']:.0f}% | {r[f'recall@{window * factor}']:.0f}% | "
        f"{r['short_loss']:.3f} | {100 * (r['short_loss'] / base_loss - 1):+.1f}% |\n" for r in rows)
    text = ("## Micro-ProLong: before / after\n\n"
            f"Recall: `{RECALL_TASK}` from `evaluation`, "
            f"{samples} samples per length (greedy). Short-text loss: held-out man pages, {window}-token rows.\n\n" + table)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    plot_recall_and_loss([r["stage"] for r in rows], [r[f"recall@{window}"] for r in rows],
                         [r[f"recall@{window * factor}"] for r in rows], [r["short_loss"] for r in rows],
                         window, factor, out / "micro-prolong.png")
    for card in cards:
        with open(Path(card) / "README.md", "a", encoding="utf-8") as f:
            f.write("\n" + text + "\n![before/after](micro-prolong.png)\n")
        shutil.copy(out / "micro-prolong.png", Path(card) / "micro-prolong.png")
    print(text)
    return text
