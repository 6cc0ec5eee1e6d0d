"""Long-context evaluation following HELMET (Recall, RAG, Re-rank, ICL, LongQA, Summ), any length.

    from evaluation import evaluate
    scores = evaluate("path/to/model", tasks=["json_kv"], lengths=[8192], output_dir="out")
"""
__all__ = ["evaluate", "TASKS", "get_task"]


def __getattr__(name):
    # lazy, so `evaluation.synthetic` / `evaluation.metrics` load without torch and transformers
    if name == "evaluate":
        from .runner import evaluate
        return evaluate
    if name in ("TASKS", "get_task"):
        from . import tasks
        return getattr(tasks, name)
    raise AttributeError(name)
