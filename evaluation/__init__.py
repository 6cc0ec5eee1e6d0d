"""Long-context evaluation following HELMET (Recall, RAG, Re-rank, ICL, LongQA, Summ), any length.

    from evaluation import evaluate
    scores = evaluate("path/to/model", tasks=["json_kv"], lengths=[8192], output_dir="out")
"""
from .runner import evaluate
from .tasks import TASKS, get_task

__all__ = ["evaluate", "TASKS", "get_task"]
