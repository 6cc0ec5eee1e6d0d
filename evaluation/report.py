"""Scores, the markdown report and the plots (matplotlib, Agg backend)."""
import json
import logging
import os
from collections import defaultdict

from prolong.redaction import redact

from .metrics import metric as metric_info
from .tasks import CATEGORIES

logger = logging.getLogger(__name__)


def _mean(values):
    values = [float(v) for v in values if isinstance(v, (int, float, bool))]
    return sum(values) / len(values) if values else None


def summarise(task, records: list) -> dict:
    """Mean of each numeric metric on its report scale (x100 for 0-1 metrics, metrics.Metric) and the task's
    primary score."""
    numeric = defaultdict(list)
    for record in records:
        for name, value in record["metrics"].items():
            if isinstance(value, (int, float, bool)):
                numeric[name].append(value)
    means = {name: _mean(values) for name, values in numeric.items()}
    means = {name: metric_info(name).report_factor * v for name, v in means.items()}
    metric, note = task.primary_metric, None
    components = task.score_components
    if components:  # Cite: HELMET averages correctness, citation recall and citation precision
        if "citation_scored" in means:  # citations were scored; a metric no sample has counts 0, as HELMET
            means[metric] = _mean([means.get(c) or 0 for c in components])
        else:
            metric, note = task.fallback_metric, "citations not scored (no nli_model): score is " + task.fallback_metric
    elif task.judged and metric not in means:
        metric, note = task.fallback_metric, "judge skipped: score is " + task.fallback_metric
    failed = sum(1 for r in records if any(k.endswith("_failed") and v == 1 for k, v in r["metrics"].items()))
    if failed:  # the score leaves these samples out (as HELMET does); a rerun with resume scores them again
        failure = f"model scorer failed on {failed} of {len(records)} samples (rerun with it reachable to score them)"
        note = failure if note is None else f"{failure}; score is {metric}"
    by_depth = defaultdict(list)
    for record in records:
        if record.get("depth") is not None:
            by_depth[round(record["depth"], 4)].append(record["metrics"].get(metric, 0))
    return {"score": means.get(metric), "metric": metric, "note": note, "n": len(records), "metrics": means,
            "by_depth": {str(d): metric_info(metric).report_factor * _mean(v) for d, v in sorted(by_depth.items())},
            "mean_input_tokens": _mean([r["input_tokens"] for r in records]),
            "truncated_samples": sum(1 for r in records if r.get("truncated_tokens"))}


def build_scores(results: list, model_name: str, config: dict, window, identity: dict | None = None,
                 left_out: list | None = None) -> dict:
    """Category averages per length over the tasks that produced a score; failed tasks are listed."""
    categories = defaultdict(lambda: defaultdict(list))
    for r in results:
        if r.get("score") is not None:
            categories[r["category"]][r["length"]].append(r["score"])
    scores = {"model": model_name, "mode": config.get("mode", "helmet"), "model_window": window, "identity": identity,
              "config": config, "results": results,
              "failed": [f"{r['task']} @ {r['length']}" for r in results if r.get("status") == "failed"],
              "left_out": list(left_out or []),
              "categories": {c: {str(length): _mean(v) for length, v in sorted(by_len.items())}
                             for c, by_len in categories.items()}}
    if "ruler" in categories:
        scores["ruler"] = {str(length): {"average": _mean(v), "tasks": len(v)}
                           for length, v in sorted(categories["ruler"].items())}
    return scores


RULER_TASK_COUNT = 13  # NVIDIA/RULER's benchmark: its summary score averages all 13 tasks


def ruler_table(ruler: dict) -> list[str]:
    """RULER's summary score per length: the mean of its tasks (RULER's tables average all 13)."""
    lengths = list(ruler)
    lines = ["## RULER", "", "Average of the RULER tasks scored at each length (RULER's summary score when all "
             f"{RULER_TASK_COUNT} ran).", "", "| | " + " | ".join(lengths) + " |", "|---" * (len(lengths) + 1) + "|",
             "| average | " + " | ".join(_fmt(ruler[n]["average"]) for n in lengths) + " |",
             "| tasks | " + " | ".join(f"{ruler[n]['tasks']} of {RULER_TASK_COUNT}" for n in lengths) + " |"]
    return lines


_STATUS_CELL = {"beyond_window": "beyond window", "failed": "FAILED"}


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _suites(scores: dict) -> str:
    """The published suites a run's tasks come from: a RULER-only run is not HELMET's."""
    categories = set(scores["categories"])
    return " and ".join(name for name, present in (("HELMET", bool(categories - {"ruler"})), ("RULER", "ruler" in categories))
                        if present) or "HELMET"


def markdown(scores: dict) -> str:
    results = scores["results"]
    lengths = sorted({r["length"] for r in results})
    lines = [f"# Long-context evaluation: {scores['model']}", "",
             f"Mode: `{scores.get('mode', 'helmet')}`" + (f" ({_suites(scores)}'s behaviour, comparable with published "
                                                          f"{_suites(scores)} numbers)"
                                                          if scores.get("mode", "helmet") == "helmet" else
                                                          " (documented fixes of HELMET; not comparable with published numbers)"),
             "", f"Model window (max_position_embeddings): {scores['model_window']}", "",
             "## Categories", "", "| category | " + " | ".join(map(str, lengths)) + " |",
             "|---" * (len(lengths) + 1) + "|"]
    for category, by_len in scores["categories"].items():
        lines.append(f"| {CATEGORIES.get(category, category)} | " + " | ".join(_fmt(by_len.get(str(n))) for n in lengths) + " |")
    if scores.get("ruler"):
        lines += ["", *ruler_table(scores["ruler"])]
    lines += ["", "## Tasks", "", "| task | metric | " + " | ".join(map(str, lengths)) + " |",
              "|---" * (len(lengths) + 2) + "|"]
    by_task = defaultdict(dict)
    for r in results:
        by_task[r["task"]][r["length"]] = r
    for task, by_len in by_task.items():
        metric = next((r.get("metric") for r in by_len.values() if r.get("metric")), "")
        cells = [_STATUS_CELL.get(by_len[n]["status"]) or _fmt(by_len[n]["score"]) if n in by_len else ""
                 for n in lengths]
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    notes = sorted({f"- {r['task']} @ {r['length']}: {r.get('message') or r.get('note')}"
                    for r in results if r.get("message") or r.get("note")})
    notes += [f"- not in this report: {item}" for item in scores.get("left_out", [])]
    if notes:
        lines += ["", "## Notes", "", *notes]
    return "\n".join(lines) + "\n"


def plot_score_vs_length(scores: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for category, by_len in scores["categories"].items():
        points = sorted((int(n), v) for n, v in by_len.items() if v is not None)
        if points:
            ax.plot(*zip(*points), marker="o", label=CATEGORIES.get(category, category))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("input length (tokens)")
    ax.set_ylabel("score")
    ax.set_ylim(-2, 102)
    if ax.lines:
        ax.legend()
    ax.set_title("Score vs. input length")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_depth_heatmap(scores: dict, path: str) -> bool:
    """Recall score for each needle depth (rows) and length (columns), averaged over recall tasks."""
    cells = defaultdict(list)
    for r in scores["results"]:
        for depth, value in (r.get("by_depth") or {}).items():
            if r["category"] == "recall":
                cells[(float(depth), r["length"])].append(value)
    if not cells:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    depths = sorted({d for d, _ in cells})
    lengths = sorted({n for _, n in cells})
    grid = [[_mean(cells.get((d, n), [])) if cells.get((d, n)) else float("nan") for n in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.4 * len(depths) + 2))
    image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    ax.set_xlabel("input length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title("Recall by needle depth")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _replace_into(path: str, write) -> None:
    """`write(tmp_path)`, then move the result into place: a reader never sees a half-written file."""
    tmp = f"{path}.tmp-{os.getpid()}{os.path.splitext(path)[1]}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # the write failed: no temporary file left behind
            os.remove(tmp)


def write_all(scores: dict, output_dir: str, plots: bool = True) -> dict:
    """Write report.md, scores.json and the plots; returns the scores as written (redacted: a judge URL's
    key, a key given as judge_api_key_env, any secret held in the environment)."""
    scores = redact(scores)

    def text_writer(text):
        def write(path):
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return write
    # the scores and the report first: a plot that fails must not lose them
    _replace_into(os.path.join(output_dir, "report.md"), text_writer(markdown(scores)))
    _replace_into(os.path.join(output_dir, "scores.json"), text_writer(json.dumps(scores, indent=2, default=str)))
    if plots:
        try:
            os.makedirs(os.path.join(output_dir, "plots"), exist_ok=True)
            _replace_into(os.path.join(output_dir, "plots", "score_vs_length.png"),
                          lambda p: plot_score_vs_length(scores, p))
            heatmap = os.path.join(output_dir, "plots", "recall_depth_heatmap.png")
            if any(r["category"] == "recall" and r.get("by_depth") for r in scores["results"]):
                _replace_into(heatmap, lambda p: plot_depth_heatmap(scores, p))
        except Exception as error:  # noqa: BLE001 - the scores and report are written; say why the plots are not
            logger.warning("plots not written into %s: %s: %s", os.path.join(output_dir, "plots"),
                           type(error).__name__, error)
    return scores
