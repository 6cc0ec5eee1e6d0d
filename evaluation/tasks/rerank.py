"""Re-rank: MS MARCO passages (HELMET's data/msmarco/*.jsonl), NDCG@10 of the parsed ranking."""
import os

from .. import metrics as M
from .common import (HELMET_LENGTHS, LoadRequest, Task, drop_duplicates, helmet_shuffle, pick_by_length, read_jsonl,
                     sample_keys, sha_seed)

MSMARCO_PASSAGES = dict(zip(HELMET_LENGTHS, [14, 50, 130, 285, 600, 1000]))
RERANK_USER = ("You are provided with a list of documents, each indicated by their ID. Rank each document based on their "
               "relevance to the question in descending order from most relelvant to least relevant texts. Include all "
               "documents in the rankings. Write your answer using the unique IDs, with the following format:\n"
               "Ranking: ID3 > ID1 > ID2\n\n{demos}{context}\n\nQuery: {question}")  # "relelvant": HELMET's spelling


def load_msmarco(task: Task, req: LoadRequest) -> list:
    k = pick_by_length(req.length, MSMARCO_PASSAGES)
    data = read_jsonl(os.path.join(req.data_dir, "msmarco", f"test_reranking_data_k{k}_dep3.jsonl"))
    demos = read_jsonl(os.path.join(req.data_dir, "msmarco", "test_reranking_data_k10_dep3.jsonl"))
    data = sample_keys(data, "qid", req.max_samples, req.seed)
    # HELMET: drop every test query from the demonstrations only when the pool stays large (its
    # k10 demo file holds the test queries themselves); otherwise only the sample's own query
    demos_filtered = len(demos) > 2 * len(data)
    if demos_filtered:
        test_qids = {d["qid"] for d in data}
        demos = [x for x in demos if x["qid"] not in test_qids]
    samples = []
    for d in data:
        template = "[ID: {id}] Document (Title: {title}): {text}" if "title" in d["ctxs"][0] else "[ID: {id}] Document: {text}"
        demo_text = ""
        if req.shots > 0:
            pool = demos if demos_filtered else [x for x in demos if x["qid"] != d["qid"]]
            for x in drop_duplicates(helmet_shuffle(pool, sha_seed(d["qid"])), "qid")[:req.shots]:
                ranking = " > ".join(c["id"] for c in sorted(x["ctxs"], key=lambda c: c["label"], reverse=True))
                demo_text += ("\n\n".join(template.format(**c) for c in x["ctxs"])
                              + f"\n\nQuery: {x['query']}\nRanking: {ranking}\n\n")
        samples.append({"id": str(d["qid"]), "question": d["query"], "demos": demo_text,
                        "context": "\n\n".join(template.format(**c) for c in d["ctxs"]),
                        "answer": " > ".join(c["id"] for c in sorted(d["ctxs"], key=lambda c: c["label"], reverse=True)),
                        "qrels": {str(c["id"]): int(c["label"]) for c in d["ctxs"]}})
    return samples


def score_rerank(output: str, sample: dict) -> dict:
    ranking = M.parse_rankings(output)
    return {"NDCG@10": M.ndcg_at_k(ranking, sample["qrels"], 10), "num_preds": len(ranking)}


TASKS = [Task(name="msmarco_rerank_psg", category="rerank", user_template=RERANK_USER, system_template="Ranking:",
              generation_max_length=200, use_chat_template=False, stop_newline=True, shots=2, primary_metric="NDCG@10",
              load=load_msmarco, score=score_rerank)]
