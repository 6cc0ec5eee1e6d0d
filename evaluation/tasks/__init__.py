"""The task registry: HELMET's prompt templates, data formats, demonstration counts and metrics.

A task turns (length, settings) into samples: dicts holding the template fields (`context`,
`question`, `demos`, ...), the gold `answer` and an `id`. Recall tasks are generated
(`synthetic.py`); the others read the files of HELMET's release (or, for ICL/LongQA/Summ, which
HELMET pulls from the Hub at run time, a jsonl export of the same Hub datasets). One module per
category builds its `Task`s; what differs between tasks of a category is a Task field or a keyword
bound to the category's loader.
"""
from . import cite, icl, longqa, rag, recall, rerank, ruler, summ
from .common import (HELMET_DATA_URL, HELMET_DOWNLOAD, HELMET_LENGTHS, TRUNCATION_MARKER, DataFileMissing,  # noqa: F401
                     LoadRequest, Task, drop_duplicates, helmet_shuffle, pick_by_length, read_jsonl, sample_keys,
                     sha_seed)
from .icl import ICL_DATASETS, balance_labels, group_by_label, icl_shots, score_icl  # noqa: F401

# the order is the report's
TASKS: dict[str, Task] = {t.name: t for module in (recall, rag, rerank, icl, longqa, summ, cite, ruler) for t in module.TASKS}

# display names, in the report's order: short in the report's tables (HELMET's columns), in full on the model card
CATEGORIES = {"recall": "Recall", "rag": "RAG", "rerank": "Re-rank", "icl": "ICL", "longqa": "LongQA", "summ": "Summ",
              "cite": "Cite", "ruler": "RULER"}
CATEGORY_FULL_NAMES = {**CATEGORIES, "summ": "Summarization"}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"Unknown task {name!r}. Known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]
