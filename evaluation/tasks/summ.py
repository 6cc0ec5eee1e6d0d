"""Summarisation: InfiniteBench Sum and Multi-LexSum, model-judged key points (ROUGE-Lsum without a judge)."""
import os
from functools import partial

from .. import metrics as M
from .books import LengthRuler, add_demos, keypoints_by_id, load_infbench
from .common import LoadRequest, Task, helmet_shuffle, read_jsonl
from .rag import score_qa

INFBENCH_SUM_USER = ("You are given a book and you are tasked to summarize it. Write a summary of about 1000 to 1200 words. "
                     "Only write about the plot and characters of the story. Do not discuss the themes or background of "
                     "the book. Do not provide any analysis or commentary.\n\n{demo}{context}\n\nNow summarize the book.")
LEXSUM_USER = ("You are given the legal documents in a civil rights lawsuit, and you are tasked to summarize the case. Write "
               "a concise summary of one paragraph (200 to 250 words). The summary should contain a short description of "
               "the background, the parties involved, and the outcomes of the case.\n\n{demo}Legal documents:\n{context}\n\n"
               "Now please summarize the case.")

def load_multi_lexsum(task: Task, req: LoadRequest) -> list:
    folder = os.path.join(req.data_dir, "multi_lexsum")
    how = (f"export the Hub dataset allenai/multi_lexsum (config v20230518) with `datasets`: "
           f"load_dataset('allenai/multi_lexsum', name='v20230518')[split].to_json('{folder}/<split>.jsonl') "
           "for validation and train")
    rows = [r for r in read_jsonl(os.path.join(folder, "validation.jsonl"), how) if r.get("summary/short") is not None]
    ruler = LengthRuler(task, req, min_doc_tokens=65536, context_margin=300)
    # judge inputs: key points from the row or HELMET's multi_lexsum_val.jsonl (optional), expert = summary/long
    keypoints = keypoints_by_id(os.path.join(folder, "multi_lexsum_val.jsonl"), "summary/short_keypoints")
    test = [{"id": str(r.get("id", i)), "context": "\n\n".join(r["sources"]), "question": "",
             "answer": r["summary/short"], "expert_summary": r.get("summary/long"),
             "keypoints": r.get("summary/short_keypoints") or keypoints.get(str(r.get("id", i))),
             } for i, r in enumerate(rows)]
    position = {id(s): i for i, s in enumerate(test)}  # the row's place in HELMET's demonstration map
    test = [s for s in test if ruler.long_enough(s["context"])]
    ruler.check_any(test, os.path.join(folder, "validation.jsonl"))
    if len(test) > req.max_samples:  # HELMET shuffles only when it subsamples
        test = helmet_shuffle(test, req.seed)[:req.max_samples]
    draws = [position[id(s)] for s in test]
    test = [{**s, "context": ruler.cut(s["context"])} for s in test]
    train = []
    if req.shots > 0:
        train = [{"id": str(r.get("id", i)), "answer": r["summary/short"]}
                 for i, r in enumerate(read_jsonl(os.path.join(folder, "train.jsonl"), how))
                 if r.get("summary/short") is not None]
    # HELMET maps the whole DatasetDict, train split first (the Hub's order), so a validation row's draw
    # comes after one per train row
    add_demos(test, train, req, lambda demos: (
        "Example summaries:\n\n" + "\n\n".join(f"Summary: {d['answer']}" for d in demos)
        + "\n\nNow, write a summary of the following legal documents.\n"), draws=[len(train) + d for d in draws])
    return test


def score_rouge(output: str, sample: dict) -> dict:
    return M.qa_metrics_with_parsing(output, sample["answer"], prefix="Summary:")


def _summary_demo(d: dict) -> str:
    return f"[story text]\nSummary: {d['answer'][0].strip()}"


_SUMM = dict(category="summ", system_template="Summary:", use_chat_template=True, stop_newline=False, shots=2,
             primary_metric="judge_f1", score=score_rouge, separator="\n\n", judged=True,
             fallback_metric="rougeLsum_f1")

TASKS = [
    Task(name="infbench_sum_eng", user_template=INFBENCH_SUM_USER, generation_max_length=1200,
         load=partial(load_infbench, file="longbook_sum_eng.jsonl", demo=_summary_demo,
                      keypoints_file="longbook_sum_eng_keypoints.jsonl"),
         judge_prompts=("fluency_book", "recall_book", "precision_book"),
         # HELMET scores it with default_post_process, parsing after "Answer:" although the prompt ends "Summary:"
         helmet_score=score_qa, **_SUMM),
    Task(name="multi_lexsum", user_template=LEXSUM_USER, generation_max_length=400, load=load_multi_lexsum,
         judge_prompts=("fluency_legal", "recall_legal", "precision_legal"), **_SUMM),
]
