"""RAG: KILT questions with retrieved passages (HELMET's data/kilt/*.jsonl), substring exact match."""
import math
import os
from functools import partial

from .. import metrics as M
from .common import (HELMET_LENGTHS, LoadRequest, Task, drop_duplicates, helmet_shuffle, pick_by_length, read_jsonl,
                     sample_keys, sha_seed)

KILT_PASSAGES = dict(zip(HELMET_LENGTHS, [20, 50, 105, 220, 440, 1000]))
RAG_USER = ("Use the given documents to write a concise and short answer to the question. Write your answer in the "
            "following format:\nAnswer: [answer]\n\n{demos}{context}\n\nQuestion: {question}")
PASSAGE = "Document (Title: {title}): {text}"


def _long_tail(rows: list) -> list:
    """HELMET's kilt_popqa_3: only long-tail entities, log10(popularity) < 3."""
    return [d for d in rows if math.log10(d["s_pop"]) < 3]


def load_kilt(task: Task, req: LoadRequest, *, test_file: str, demo_file: str, long_tail_only: bool = False) -> list:
    """`test_file` holds `{k}` (passages per question); PopQA's demonstrations come from its own test
    file, so `long_tail_only` also leaves the sample itself out of its demonstrations."""
    k = pick_by_length(req.length, KILT_PASSAGES)
    data = read_jsonl(os.path.join(req.data_dir, "kilt", test_file.format(k=k)))
    demos = read_jsonl(os.path.join(req.data_dir, "kilt", demo_file))
    if long_tail_only:
        data, demos = _long_tail(data), _long_tail(demos)
    key = "id" if "id" in data[0] else "question"
    data = sample_keys(data, key, req.max_samples, req.seed)
    samples = []
    for d in data:
        demo_text = ""
        if req.shots > 0:
            pool = [x for x in demos if x[key] != d[key]] if long_tail_only else demos
            chosen = drop_duplicates(helmet_shuffle(pool, sha_seed(d[key])), key)[:req.shots]  # str(id), as HELMET
            demo_text = "\n\n".join(
                "\n\n".join(PASSAGE.format(**c) for c in x["ctxs"]) + f"\n\nQuestion: {x['question']}\nAnswer: {x['answers'][0]}"
                for x in chosen) + "\n\n"
        samples.append({"id": str(d[key]), "question": d["question"], "answer": d["answers"], "demos": demo_text,
                        "context": "\n\n".join(PASSAGE.format(**c) for c in d["ctxs"])})
    return samples


def score_qa(output: str, sample: dict) -> dict:
    return M.qa_metrics_with_parsing(output, sample["answer"])


KILT_FILES = {"kilt_nq": ("nq-dev-multikilt_1000_k{k}_dep6.jsonl", "nq-train-multikilt_1000_k3_dep6.jsonl"),
              "kilt_triviaqa": ("triviaqa-dev-multikilt_1000_k{k}_dep6.jsonl", "triviaqa-train-multikilt_1000_k3_dep6.jsonl"),
              "kilt_hotpotqa": ("hotpotqa-dev-multikilt_1000_k{k}_dep3.jsonl", "hotpotqa-train-multikilt_1000_k3_dep3.jsonl"),
              "kilt_popqa_3": ("popqa_test_1000_k{k}_dep6.jsonl", "popqa_test_1000_k3_dep6.jsonl")}

TASKS = [Task(name=name, category="rag", user_template=RAG_USER, system_template="Answer:", generation_max_length=20,
              use_chat_template=False, stop_newline=True, shots=2, primary_metric="substring_exact_match",
              load=partial(load_kilt, test_file=test_file, demo_file=demo_file, long_tail_only=name == "kilt_popqa_3"),
              score=score_qa)
         for name, (test_file, demo_file) in KILT_FILES.items()]
