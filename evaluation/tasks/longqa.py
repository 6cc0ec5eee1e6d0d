"""LongQA: NarrativeQA (model-judged), InfiniteBench QA (ROUGE-L F1) and multiple choice (exact match)."""
import os
from functools import partial

from .. import metrics as M
from .books import BOOK_LIMITS, LengthRuler, add_demos, infbench_choice_sample, load_infbench
from .common import LoadRequest, Task, helmet_shuffle, read_jsonl
from .rag import score_qa

NARRATIVEQA_USER = ("You are given a story, which can be either a novel or a movie script, and a question. Answer the "
                    "question as concisely as you can, using a single phrase if possible.\n\n{demo}{context}\n\nQuestion: {question}")
INFBENCH_QA_USER = ("You are given a story and a question. Answer the question as concisely as you can, using a single "
                    "phrase if possible.\n\n{demo}{context}\n\nQuestion: {question}")
INFBENCH_MC_USER = ("You are given a story and a question with multiple choices. Choose the best answer from the options "
                    "provided. Only one of the following options is correct, output the answer using one single letter "
                    "(A, B, C, or D). Don't say anything else.\n\n{demo}{context}\n\nQuestion: {question}\nOptions:\n{options}")

def _narrativeqa_row(row: dict, index: int) -> dict:
    """Accept the Hub layout (document.text, question.text, answers[].text) or a flat one."""
    if isinstance(row.get("document"), dict):
        return {"id": f"{row['document'].get('id', '')}-{index}", "context": row["document"]["text"],
                "question": row["question"]["text"], "answer": [a["text"] for a in row["answers"]]}
    return {"id": str(row.get("id", index)), "context": row["context"], "question": row["question"],
            "answer": row["answer"] if isinstance(row["answer"], list) else [row["answer"]]}


def load_narrativeqa(task: Task, req: LoadRequest) -> list:
    folder = os.path.join(req.data_dir, "narrativeqa")
    how = (f"export the Hub dataset deepmind/narrativeqa with `datasets`: load_dataset('deepmind/narrativeqa')"
           f"[split].to_json('{folder}/<split>.jsonl') for test and train")
    test = [_narrativeqa_row(r, i) for i, r in enumerate(read_jsonl(os.path.join(folder, "test.jsonl"), how))]
    ruler = LengthRuler(task, req, **{**BOOK_LIMITS, "min_doc_tokens": 131072 + 1})
    # HELMET: shuffle, keep books over 131,072 tokens, take the first max_samples (the filter is per
    # row, so stopping at max_samples gives the same rows without measuring every book)
    chosen = []
    for sample in helmet_shuffle(test, req.seed):
        if len(chosen) == req.max_samples:
            break
        if ruler.long_enough(sample["context"]):
            chosen.append({**sample, "context": ruler.cut(sample["context"])})
    ruler.check_any(chosen, os.path.join(folder, "test.jsonl"))
    train = []
    if req.shots > 0:
        train = [_narrativeqa_row(r, i) for i, r in enumerate(read_jsonl(os.path.join(folder, "train.jsonl"), how))]
    # HELMET draws the demonstrations row by row over the filtered, shuffled test set: `chosen` is its head
    add_demos(chosen, train, req, lambda demos: (
        "For example:\n\n" + "\n\n".join(f"Question: {d['question']}\nAnswer: {d['answer'][0]}" for d in demos)
        + "\n\nNow, use the following story to answer the question:\n\n"), draws=list(range(len(chosen))))
    return chosen


def score_choice(output: str, sample: dict) -> dict:
    return M.multiple_choice_metrics(output, sample["answer"])


def _qa_demo(d: dict) -> str:
    return f"[story text]\nQuestion: {d['question']}\nAnswer: {d['answer'][0]}"


def _choice_demo(d: dict) -> str:
    return f"[story text]\nQuestion: {d['question']}\nOptions:\n{d['options']}\nAnswer: {d['answer'][0]}"


_BOOK_QA = dict(category="longqa", system_template="Answer:", use_chat_template=True, stop_newline=False, shots=2)

TASKS = [
    Task(name="narrativeqa", user_template=NARRATIVEQA_USER, generation_max_length=100, primary_metric="judge_score",
         load=load_narrativeqa, score=score_qa, judged=True, judge_prompts=("longqa",), fallback_metric="rougeL_f1",
         **_BOOK_QA),
    Task(name="infbench_qa_eng", user_template=INFBENCH_QA_USER, generation_max_length=10, primary_metric="rougeL_f1",
         load=partial(load_infbench, file="longbook_qa_eng.jsonl", demo=_qa_demo), score=score_qa, **_BOOK_QA),
    Task(name="infbench_choice_eng", user_template=INFBENCH_MC_USER, generation_max_length=10,
         primary_metric="exact_match", load=partial(load_infbench, file="longbook_choice_eng.jsonl", demo=_choice_demo,
                                                    row_to_sample=infbench_choice_sample),
         score=score_choice, **_BOOK_QA),
]
