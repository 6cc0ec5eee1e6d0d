"""The task registry: HELMET's prompt templates, data formats, demonstration counts and metrics.

A task turns (length, settings) into samples: dicts holding the template fields (`context`,
`question`, `demos`, ...), the gold `answer` and an `id`. Recall tasks are generated
(`synthetic.py`); the others read the files of HELMET's release (or, for ICL/LongQA/Summ, which
HELMET pulls from the Hub at run time, a jsonl export of the same Hub datasets).
"""
import gzip
import hashlib
import json
import math
import os
import random
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import numpy as np

from . import metrics as M
from . import synthetic

HELMET_DATA_URL = "https://huggingface.co/datasets/princeton-nlp/HELMET"
HELMET_DOWNLOAD = (f"download {HELMET_DATA_URL}/resolve/main/data.tar.gz and extract it "
                   "(HELMET's scripts/download_data.sh), then pass --data_dir pointing at the extracted data/ folder")
HELMET_LENGTHS = [4096, 8192, 16384, 32768, 65536, 131072]
TRUNCATION_MARKER = " ... [the rest of the text is omitted]"  # HELMET's truncate_llama2 postfix


class DataFileMissing(FileNotFoundError):
    """A task's data file is absent; the message says where to get it."""


@dataclass
class LoadRequest:
    """What a task loader needs to produce the samples of one length."""
    length: int                      # total token budget: input + generation
    input_budget: int                # tokens the prompt may use (length - generation_max_length)
    max_samples: int
    seed: int
    shots: int
    data_dir: str
    num_depths: int = 11
    count_tokens: Callable[[dict], int] | None = None  # renders fields with the task's template
    mode: str = "helmet"             # helmet | fixed (config key `mode`; docs/evaluation.md)
    # tokenizer (or a name for AutoTokenizer) that measures LongQA/Summ documents for HELMET's
    # length filters and context cut; HELMET uses meta-llama/Llama-2-7b-hf for every model
    length_tokenizer: object = None


@dataclass(frozen=True)
class Task:
    name: str
    category: str
    user_template: str
    system_template: str             # the answer prefix ("Answer:"), appended after `separator`
    generation_max_length: int
    use_chat_template: bool          # HELMET: off for Recall/RAG/Re-rank/ICL, on for QA/Summ/Cite
    stop_newline: bool               # HELMET's configs meant these; its code never applied them
    shots: int
    primary_metric: str
    load: Callable[["Task", LoadRequest], list]
    score: Callable[[str, dict], dict]  # (model output, sample) -> metrics
    separator: str = "\n"
    default_max_samples: int = 100
    judged: bool = False             # has a model-judged score (NarrativeQA, summarisation)
    fallback_metric: str | None = None  # reported when the judge is not configured
    extra: dict = field(default_factory=dict)

    def fields(self, sample: dict) -> dict:
        """Template fields with the system template formatted too (RULER's mentions the query)."""
        return {**sample, "demos": sample.get("demos", ""), "demo": sample.get("demo", "")}

    def user_prompt(self, sample: dict) -> str:
        return self.user_template.format(**self.fields(sample))

    def answer_prefix(self, sample: dict) -> str:
        return self.system_template.format(**self.fields(sample))

    def default_stop_newline(self, mode: str) -> bool:
        """HELMET's configs say `stop_new_line: true` for RAG/Re-rank/ICL, but its flag is
        `--stop_newline`, so HELMET never stops at a newline: `helmet` mode keeps that."""
        return self.stop_newline and mode == "fixed"

    def score_output(self, output: str, sample: dict, use_chat_template: bool, mode: str = "helmet") -> dict:
        """Score as HELMET's eval.py: without a chat template the model completed the answer
        prefix ("Answer:", "label:", ...), so the prefix is put back before parsing (both modes).
        `helmet` mode uses HELMET's scorer where ours fixes it (`extra["helmet_score"]`)."""
        if not use_chat_template:
            output = self.answer_prefix(sample) + output
        score = self.extra.get("helmet_score", self.score) if mode == "helmet" else self.score
        return score(output, sample)


# ---------------------------------------------------------------------------------------------
# helpers

def read_jsonl(path: str, how_to_get: str = HELMET_DOWNLOAD) -> list[dict]:
    """A .json/.jsonl file, or its gzip-compressed `<path>.gz` when only that exists."""
    opener = open
    if not os.path.exists(path) and os.path.exists(path + ".gz"):
        path, opener = path + ".gz", gzip.open
    if not os.path.exists(path):
        raise DataFileMissing(f"Data file not found: {path}. To get it: {how_to_get}.")
    with opener(path, "rt", encoding="utf-8") as f:
        if path.endswith(".json"):
            data = json.load(f)
            return data["data"] if isinstance(data, dict) else data
        return [json.loads(line) for line in f if line.strip()]


def sha_seed(key) -> int:
    """HELMET's per-sample seed: sha256 of `str(key)` (PopQA ids are integers), as a positive 31-bit integer."""
    return int(hashlib.sha256(str(key).encode("utf-8")).hexdigest(), 16) % 2**31


def helmet_shuffle(rows: list, seed: int) -> list:
    """`datasets.Dataset.shuffle(seed=...)` order (numpy default_rng permutation), without datasets."""
    return [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]


def drop_duplicates(rows: list, key: str) -> list:
    seen, out = set(), []
    for row in rows:
        if row[key] not in seen:
            seen.add(row[key])
            out.append(row)
    return out


def pick_by_length(length: int, table: dict) -> object:
    """The entry for the smallest HELMET length >= `length` (the largest beyond 128K): its context is
    then cut at the end to fit, never padded."""
    for nominal in sorted(table):
        if nominal >= length:
            return table[nominal]
    return table[max(table)]


def sample_keys(rows: list, key: str, max_samples: int, seed: int) -> list:
    """HELMET's subsampling for RAG/Re-rank: random.sample over sorted ids, file order kept."""
    keys = sorted({r[key] for r in rows})
    chosen = set(random.Random(seed).sample(keys, min(max_samples, len(keys))))
    return [r for r in rows if r[key] in chosen]


# ---------------------------------------------------------------------------------------------
# Recall (generated)

RULER_SINGLE_USER = ("A special magic {type_needle_v} is hidden within the following text. Make sure to memorize it. "
                     "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
                     "What is the special magic {type_needle_v} for {query} mentioned in the provided text?")
RULER_SINGLE_SYSTEM = "The special magic {type_needle_v} for {query} mentioned in the provided text is"
RULER_MULTI_USER = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
                    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
                    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?")
RULER_MULTI_SYSTEM = "The special magic {type_needle_v} for {query} mentioned in the provided text are"
JSON_KV_USER = ("{context}\n\nExtract the value corresponding to the specified key in the JSON object below.\n\n"
                "{demos}Key: {question}")


def load_synthetic(task: Task, req: LoadRequest) -> list:
    builder = synthetic.BUILDERS[task.extra["builder"]]
    samples = []
    for index, depth in enumerate(synthetic.needle_depths(req.max_samples, req.num_depths)):
        sample_seed = synthetic.stable_seed(task.name, req.length, index, req.seed)
        n_items, fields = synthetic.fit_items_to_length(
            lambda n: builder(sample_seed, n, depth, shots=req.shots), req.count_tokens, req.input_budget)
        samples.append({"id": f"{task.name}-{req.length}-{index}", "num_items": n_items, **fields})
    return samples


def score_json_kv(output: str, sample: dict) -> dict:
    return M.qa_metrics_with_parsing(output, sample["answer"], prefix="corresponding value:")


def score_ruler(output: str, sample: dict) -> dict:
    return {"ruler_recall": M.recall_share(output, sample["answer"])}


# ---------------------------------------------------------------------------------------------
# RAG: KILT with retrieved passages (HELMET's data/kilt/*.jsonl)

KILT_FILES = {"kilt_nq": ("nq-dev-multikilt_1000_k{k}_dep6.jsonl", "nq-train-multikilt_1000_k3_dep6.jsonl"),
              "kilt_triviaqa": ("triviaqa-dev-multikilt_1000_k{k}_dep6.jsonl", "triviaqa-train-multikilt_1000_k3_dep6.jsonl"),
              "kilt_hotpotqa": ("hotpotqa-dev-multikilt_1000_k{k}_dep3.jsonl", "hotpotqa-train-multikilt_1000_k3_dep3.jsonl"),
              "kilt_popqa_3": ("popqa_test_1000_k{k}_dep6.jsonl", "popqa_test_1000_k3_dep6.jsonl")}
KILT_PASSAGES = dict(zip(HELMET_LENGTHS, [20, 50, 105, 220, 440, 1000]))
RAG_USER = ("Use the given documents to write a concise and short answer to the question. Write your answer in the "
            "following format:\nAnswer: [answer]\n\n{demos}{context}\n\nQuestion: {question}")
PASSAGE = "Document (Title: {title}): {text}"


def load_kilt(task: Task, req: LoadRequest) -> list:
    test_name, demo_name = KILT_FILES[task.name]
    k = pick_by_length(req.length, KILT_PASSAGES)
    data = read_jsonl(os.path.join(req.data_dir, "kilt", test_name.format(k=k)))
    demos = read_jsonl(os.path.join(req.data_dir, "kilt", demo_name))
    if "popqa" in task.name:  # HELMET's kilt_popqa_3: only long-tail entities, log10(popularity) < 3
        data = [d for d in data if math.log10(d["s_pop"]) < 3]
        demos = [d for d in demos if math.log10(d["s_pop"]) < 3]
    key = "id" if "id" in data[0] else "question"
    data = sample_keys(data, key, req.max_samples, req.seed)
    samples = []
    for d in data:
        demo_text = ""
        if req.shots > 0:
            pool = [x for x in demos if x[key] != d[key]] if "popqa" in task.name else demos
            chosen = drop_duplicates(helmet_shuffle(pool, sha_seed(d[key])), key)[:req.shots]  # str(id), as HELMET
            demo_text = "\n\n".join(
                "\n\n".join(PASSAGE.format(**c) for c in x["ctxs"]) + f"\n\nQuestion: {x['question']}\nAnswer: {x['answers'][0]}"
                for x in chosen) + "\n\n"
        samples.append({"id": str(d[key]), "question": d["question"], "answer": d["answers"], "demos": demo_text,
                        "context": "\n\n".join(PASSAGE.format(**c) for c in d["ctxs"])})
    return samples


def score_qa(output: str, sample: dict) -> dict:
    return M.qa_metrics_with_parsing(output, sample["answer"])


# ---------------------------------------------------------------------------------------------
# Re-rank: MS MARCO (HELMET's data/msmarco/*.jsonl)

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


# ---------------------------------------------------------------------------------------------
# ICL: many-shot classification with labels mapped to shuffled integers

ICL_DATASETS = {  # name: (label field, number of labels, Hub dataset, HELMET shots at 4K..128K)
    "icl_trec_coarse": ("coarse_label", 6, "CogComp/trec", [200, 400, 800, 1600, 3300, 6600]),
    "icl_trec_fine": ("fine_label", 50, "CogComp/trec", [200, 400, 800, 1600, 3200, 6400]),
    "icl_banking77": ("label", 77, "PolyAI/banking77", [180, 360, 720, 1450, 2900, 5900]),
    "icl_clinic150": ("intent", 151, "clinc_oos (config plus; test = validation split)", [220, 440, 880, 1750, 3525, 7050]),
    "icl_nlu": ("label", 68, "xingkunliuxtracta/nlu_evaluation_data (train split only)", [250, 510, 1020, 2040, 4080, 8296]),
}
ICL_USER = ("Use the provided mapping from the text to label to assign a label to the text. Only output \"label: {{label}}\" "
            "and nothing else. \n\n{context}\n\n{question}")


def icl_shots(name: str, length: int) -> int:
    """HELMET's shot count at its lengths; linear in length elsewhere (e.g. 256K, or tiny test lengths)."""
    table = dict(zip(HELMET_LENGTHS, ICL_DATASETS[name][3]))
    return table.get(length, max(1, round(table[131072] * length / 131072)))


def group_by_label(rows: list, label_field: str) -> dict:
    """{label: rows} in order of first appearance (the order HELMET's balance_labels walks)."""
    by_label = {}
    for x in rows:
        by_label.setdefault(x[label_field], []).append(x)
    return by_label


def balance_labels(rows: list, label_field: str, shots: int, seed: int, by_label: dict | None = None) -> list:
    """HELMET's label-balanced sampling: `shots` rows in rounds holding one row per label, each
    round in a seeded random order. HELMET calls it per test sample (seed from the sample's text)
    for the demonstrations, and once (the run's seed) to subsample a large test set."""
    rand = random.Random(seed)
    by_label = by_label if by_label is not None else group_by_label(rows, label_field)
    rounds = math.ceil(shots / len(by_label))
    grouped = [[] for _ in range(rounds)]
    for samples in by_label.values():
        indices = rand.sample(range(len(samples)), rounds % len(samples))  # sic: HELMET's expression
        while len(indices) < rounds:
            indices += rand.sample(range(len(samples)), min(rounds - len(indices), len(samples)))
        for i, idx in enumerate(indices):
            grouped[i].append(samples[idx])
    for group in grouped:
        rand.shuffle(group)
    return [x for group in grouped for x in group][:shots]


def load_icl(task: Task, req: LoadRequest) -> list:
    label_field, num_labels, hub, _ = ICL_DATASETS[task.name]
    folder = os.path.join(req.data_dir, "icl")
    how = (f"HELMET reads it from the Hub: export it with `datasets`, e.g. load_dataset('{hub.split(' ')[0]}')"
           f"[split].to_json('{folder}/{task.name}_<split>.jsonl') for the train and test splits")
    train = read_jsonl(os.path.join(folder, f"{task.name}_train.jsonl"), how)
    if task.name == "icl_nlu":  # HELMET splits the single train split 90/10 with the seed
        from datasets import Dataset
        split = Dataset.from_list(train).train_test_split(test_size=0.1, seed=req.seed)
        train, test = split["train"].to_list(), split["test"].to_list()
    else:
        test = read_jsonl(os.path.join(folder, f"{task.name}_test.jsonl"), how)
    if len(test) > req.max_samples:  # HELMET: shuffle, then a label-balanced subset
        test = balance_labels(helmet_shuffle(test, req.seed), label_field, req.max_samples, req.seed)
    shots = icl_shots(task.name, req.length)
    train_by_label = group_by_label(train, label_field)
    samples = []
    for index, x in enumerate(test):
        local_seed = (int(hashlib.sha256(x["text"].encode("utf-8")).hexdigest(), 16) + req.seed) % 2**31
        # HELMET's "_balance" configs: each test sample draws its own balanced demonstrations
        demos = balance_labels(train, label_field, shots, local_seed, train_by_label)
        mapping = list(range(num_labels))
        random.Random(local_seed).shuffle(mapping)  # labels -> shuffled integers, per test sample
        context = "\n\n".join(f"{d['text']}\nlabel: {mapping[int(d[label_field])]}" for d in demos)
        samples.append({"id": f"{index}-{local_seed}", "context": context,
                        "question": x["text"], "answer": str(mapping[int(x[label_field])]), "shots": shots})
    return samples


def score_icl(output: str, sample: dict) -> dict:
    parsed = M.parse_output(output, "label:") or ""
    return {"exact_match": M.exact_match(parsed, sample["answer"]), "parsed_output": parsed}


# ---------------------------------------------------------------------------------------------
# LongQA and summarisation: books and legal documents, cut at the end to fit

NARRATIVEQA_USER = ("You are given a story, which can be either a novel or a movie script, and a question. Answer the "
                    "question as concisely as you can, using a single phrase if possible.\n\n{demo}{context}\n\nQuestion: {question}")
INFBENCH_QA_USER = ("You are given a story and a question. Answer the question as concisely as you can, using a single "
                    "phrase if possible.\n\n{demo}{context}\n\nQuestion: {question}")
INFBENCH_MC_USER = ("You are given a story and a question with multiple choices. Choose the best answer from the options "
                    "provided. Only one of the following options is correct, output the answer using one single letter "
                    "(A, B, C, or D). Don't say anything else.\n\n{demo}{context}\n\nQuestion: {question}\nOptions:\n{options}")
INFBENCH_SUM_USER = ("You are given a book and you are tasked to summarize it. Write a summary of about 1000 to 1200 words. "
                     "Only write about the plot and characters of the story. Do not discuss the themes or background of "
                     "the book. Do not provide any analysis or commentary.\n\n{demo}{context}\n\nNow summarize the book.")
LEXSUM_USER = ("You are given the legal documents in a civil rights lawsuit, and you are tasked to summarize the case. Write "
               "a concise summary of one paragraph (200 to 250 words). The summary should contain a short description of "
               "the background, the parties involved, and the outcomes of the case.\n\n{demo}Legal documents:\n{context}\n\n"
               "Now please summarize the case.")
INFBENCH_HOW = ("download the InfiniteBench file from https://huggingface.co/datasets/xinrongzhang2022/InfiniteBench "
                "(longbook_*.jsonl) into {folder}")


def _pick_demos(pool: list, exclude_id, count: int, seed: int) -> list:
    """Deterministic demonstrations (HELMET shuffled these without a seed)."""
    pool = [p for p in pool if p["id"] != exclude_id]
    return random.Random(synthetic.stable_seed(exclude_id, seed)).sample(pool, min(count, len(pool)))


def _add_demos(test: list, train: list, req: LoadRequest, render: Callable[[list], str]) -> None:
    """Each test sample's `demo` field: `render` of its own deterministic demonstrations, or ''."""
    for sample in test:
        sample["demo"] = render(_pick_demos(train, sample["id"], req.shots, req.seed)) if req.shots > 0 else ""


def _narrativeqa_row(row: dict, index: int) -> dict:
    """Accept the Hub layout (document.text, question.text, answers[].text) or a flat one."""
    if isinstance(row.get("document"), dict):
        return {"id": f"{row['document'].get('id', '')}-{index}", "context": row["document"]["text"],
                "question": row["question"]["text"], "answer": [a["text"] for a in row["answers"]]}
    return {"id": str(row.get("id", index)), "context": row["context"], "question": row["question"],
            "answer": row["answer"] if isinstance(row["answer"], list) else [row["answer"]]}


@lru_cache(maxsize=4)
def _tokenizer_by_name(name: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(name)


_DOCUMENT_MEASURES: dict = {}  # id(tokenizer) -> (tokenizer, {text digest: {"length": n, cut index: char}})


class LengthRuler:
    """HELMET's document measures for LongQA/Summ (data.py `filter_length`, `truncate_llama2`),
    with the tokenizer the run names (HELMET: Llama-2's, for every model). Each book is tokenized
    once per (tokenizer, cut point) and remembered by text digest: NarrativeQA repeats a book for
    every one of its questions, InfiniteBench uses the same books in three tasks, and a run loads
    each task once per length."""

    def __init__(self, task: Task, req: LoadRequest):
        tokenizer = req.length_tokenizer
        if tokenizer is None:
            raise ValueError(f"{task.name}: LoadRequest.length_tokenizer is needed to apply HELMET's document "
                             "length filter and context cut (pass the model's tokenizer or a tokenizer name)")
        self.tokenizer = _tokenizer_by_name(tokenizer) if isinstance(tokenizer, str) else tokenizer
        # the context keeps this many tokens (HELMET's dataset-name suffix: length - generation - 200;
        # Multi-LexSum length - 400 - 300), the rest is replaced by TRUNCATION_MARKER
        self.context_tokens = req.input_budget - task.extra["context_margin"]
        # truncate_llama2 keeps the text up to the end of this token (its tokens include the marker's)
        self.cut_index = self.context_tokens - len(self.tokenizer(TRUNCATION_MARKER)["input_ids"])
        # HELMET keeps documents of at least `min_doc_tokens` at every length; `fixed` also asks for
        # a full context, so beyond 128K every prompt is as long as its nominal length
        self.min_tokens = task.extra["min_doc_tokens"]
        if req.mode == "fixed":
            self.min_tokens = max(self.min_tokens, self.context_tokens)
        # the entry holds the tokenizer, so its id cannot be reused by another one
        self._measures = _DOCUMENT_MEASURES.setdefault(id(self.tokenizer), (self.tokenizer, {}))[1]

    def _measure(self, text: str) -> dict:
        key = hashlib.sha1(text.encode("utf-8")).digest()
        entry = self._measures.get(key)
        if entry is None or (entry["length"] > self.context_tokens and self.cut_index not in entry):
            encoding = self.tokenizer(text, return_offsets_mapping=True)  # special tokens included, as HELMET
            entry = self._measures.setdefault(key, {"length": len(encoding["input_ids"])})
            if entry["length"] > self.context_tokens:
                entry[self.cut_index] = encoding["offset_mapping"][self.cut_index][1]
        return entry

    def long_enough(self, text: str) -> bool:
        return self._measure(text)["length"] >= self.min_tokens

    def check_any(self, kept: list, path: str) -> None:
        """A task whose every document fails the filter is an error, not an empty score."""
        if not kept:
            raise ValueError(f"No document in {path} has at least {self.min_tokens} tokens of the length tokenizer "
                             "(HELMET's length filter); use the full dataset, or a length_tokenizer that matches it")

    def cut(self, text: str) -> str:
        entry = self._measure(text)
        if entry["length"] <= self.context_tokens:
            return text
        return text[:entry[self.cut_index]] + TRUNCATION_MARKER


def load_narrativeqa(task: Task, req: LoadRequest) -> list:
    folder = os.path.join(req.data_dir, "narrativeqa")
    how = (f"export the Hub dataset deepmind/narrativeqa with `datasets`: load_dataset('deepmind/narrativeqa')"
           f"[split].to_json('{folder}/<split>.jsonl') for test and train")
    test = [_narrativeqa_row(r, i) for i, r in enumerate(read_jsonl(os.path.join(folder, "test.jsonl"), how))]
    ruler = LengthRuler(task, req)
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
    _add_demos(chosen, train, req, lambda demos: (
        "For example:\n\n" + "\n\n".join(f"Question: {d['question']}\nAnswer: {d['answer'][0]}" for d in demos)
        + "\n\nNow, use the following story to answer the question:\n\n"))
    return chosen


def load_infbench(task: Task, req: LoadRequest) -> list:
    folder = os.path.join(req.data_dir, "infbench")
    rows = read_jsonl(os.path.join(folder, task.extra["file"]), INFBENCH_HOW.format(folder=folder))
    samples = []
    for row in rows:
        sample = {"id": row["id"], "context": row["context"], "question": row["input"], "demo": "", "answer": row["answer"]}
        if task.name == "infbench_choice_eng":
            letter = chr(ord("A") + row["options"].index(row["answer"][0]))
            sample["options"] = "A. {}\nB. {}\nC. {}\nD. {}".format(*row["options"])
            sample["answer"] = [letter, f"{letter}. {row['answer'][0]}"]
        samples.append(sample)
    # HELMET: demonstrations from the whole file, then the length filter and cut, then shuffle + select
    ruler = LengthRuler(task, req)
    kept = [s for s in samples if ruler.long_enough(s["context"])]
    ruler.check_any(kept, os.path.join(folder, task.extra["file"]))
    chosen = [{**s, "context": ruler.cut(s["context"])} for s in helmet_shuffle(kept, req.seed)[:req.max_samples]]
    if task.name == "infbench_sum_eng":  # key points for the summarisation judge (HELMET's file; optional)
        keypoints = _keypoints_by_id(os.path.join(folder, "longbook_sum_eng_keypoints.jsonl"), "keypoints")
        for sample in chosen:
            sample["keypoints"] = keypoints.get(str(sample["id"]))
    if req.shots > 0:
        for sample in chosen:
            demos = helmet_shuffle([s for s in samples if s["id"] != sample["id"]], req.seed)[:req.shots]
            if task.name == "infbench_sum_eng":
                text = "\n\n".join(f"[story text]\nSummary: {d['answer'][0].strip()}" for d in demos)
            elif task.name == "infbench_choice_eng":
                text = "\n\n".join(f"[story text]\nQuestion: {d['question']}\nOptions:\n{d['options']}\nAnswer: {d['answer'][0]}" for d in demos)
            else:
                text = "\n\n".join(f"[story text]\nQuestion: {d['question']}\nAnswer: {d['answer'][0]}" for d in demos)
            sample["demo"] = f"For example:\n\n{text}\n\nNow, read the following story:\n\n"
    return [{**s, "id": str(s["id"])} for s in chosen]


def load_multi_lexsum(task: Task, req: LoadRequest) -> list:
    folder = os.path.join(req.data_dir, "multi_lexsum")
    how = (f"export the Hub dataset allenai/multi_lexsum (config v20230518) with `datasets`: "
           f"load_dataset('allenai/multi_lexsum', name='v20230518')[split].to_json('{folder}/<split>.jsonl') "
           "for validation and train")
    rows = [r for r in read_jsonl(os.path.join(folder, "validation.jsonl"), how) if r.get("summary/short") is not None]
    ruler = LengthRuler(task, req)
    # judge inputs: key points from the row or HELMET's multi_lexsum_val.jsonl (optional), expert = summary/long
    keypoints = _keypoints_by_id(os.path.join(folder, "multi_lexsum_val.jsonl"), "summary/short_keypoints")
    test = [{"id": str(r.get("id", i)), "context": "\n\n".join(r["sources"]), "question": "",
             "answer": r["summary/short"], "expert_summary": r.get("summary/long"),
             "keypoints": r.get("summary/short_keypoints") or keypoints.get(str(r.get("id", i))),
             } for i, r in enumerate(rows)]
    test = [s for s in test if ruler.long_enough(s["context"])]
    ruler.check_any(test, os.path.join(folder, "validation.jsonl"))
    if len(test) > req.max_samples:  # HELMET shuffles only when it subsamples
        test = helmet_shuffle(test, req.seed)[:req.max_samples]
    test = [{**s, "context": ruler.cut(s["context"])} for s in test]
    train = []
    if req.shots > 0:
        train = [{"id": str(r.get("id", i)), "answer": r["summary/short"]}
                 for i, r in enumerate(read_jsonl(os.path.join(folder, "train.jsonl"), how))
                 if r.get("summary/short") is not None]
    _add_demos(test, train, req, lambda demos: (
        "Example summaries:\n\n" + "\n\n".join(f"Summary: {d['answer']}" for d in demos)
        + "\n\nNow, write a summary of the following legal documents.\n"))
    return test


def _keypoints_by_id(path: str, key: str) -> dict:
    """{id: key points} from one of HELMET's key-point files; {} when the file is absent (judge then skips)."""
    if not os.path.exists(path):
        return {}
    return {str(r["id"]): r[key] for r in read_jsonl(path) if r.get(key)}


def score_rouge(output: str, sample: dict) -> dict:
    return M.qa_metrics_with_parsing(output, sample["answer"], prefix="Summary:")


def score_choice(output: str, sample: dict) -> dict:
    return M.multiple_choice_metrics(output, sample["answer"])


# ---------------------------------------------------------------------------------------------

def _task(name, category, user, system, gen, chat, stop, shots, metric, load, score, **kw) -> Task:
    return Task(name=name, category=category, user_template=user, system_template=system, generation_max_length=gen,
                use_chat_template=chat, stop_newline=stop, shots=shots, primary_metric=metric, load=load, score=score, **kw)


# HELMET's LongQA/Summ limits (data.py, scripts/generate_configs.py): documents of at least 65,536
# tokens (NarrativeQA: over 131,072), context cut to length - generation - 200 tokens
BOOK_LIMITS = {"min_doc_tokens": 65536, "context_margin": 200}

TASKS: dict[str, Task] = {t.name: t for t in [
    _task("json_kv", "recall", JSON_KV_USER, "Corresponding value:", 100, False, False, 2, "substring_exact_match",
          load_synthetic, score_json_kv, extra={"builder": "json_kv"}),
    _task("ruler_mk_needle", "recall", RULER_SINGLE_USER, RULER_SINGLE_SYSTEM, 50, False, False, 0, "ruler_recall",
          load_synthetic, score_ruler, extra={"builder": "ruler_mk_needle"}),
    _task("ruler_mk_uuid", "recall", RULER_SINGLE_USER, RULER_SINGLE_SYSTEM, 100, False, False, 0, "ruler_recall",
          load_synthetic, score_ruler, extra={"builder": "ruler_mk_uuid"}),
    _task("ruler_mv", "recall", RULER_MULTI_USER, RULER_MULTI_SYSTEM, 50, False, False, 0, "ruler_recall",
          load_synthetic, score_ruler, extra={"builder": "ruler_mv"}),
    *[_task(name, "rag", RAG_USER, "Answer:", 20, False, True, 2, "substring_exact_match", load_kilt, score_qa)
      for name in KILT_FILES],
    _task("msmarco_rerank_psg", "rerank", RERANK_USER, "Ranking:", 200, False, True, 2, "NDCG@10", load_msmarco, score_rerank),
    *[_task(name, "icl", ICL_USER, "label:", 20, False, True, 0, "exact_match", load_icl, score_icl, default_max_samples=500)
      for name in ICL_DATASETS],
    _task("narrativeqa", "longqa", NARRATIVEQA_USER, "Answer:", 100, True, False, 2, "judge_score", load_narrativeqa,
          score_qa, judged=True, fallback_metric="rougeL_f1", extra={**BOOK_LIMITS, "min_doc_tokens": 131072 + 1}),
    _task("infbench_qa_eng", "longqa", INFBENCH_QA_USER, "Answer:", 10, True, False, 2, "rougeL_f1", load_infbench,
          score_qa, extra={**BOOK_LIMITS, "file": "longbook_qa_eng.jsonl"}),
    _task("infbench_choice_eng", "longqa", INFBENCH_MC_USER, "Answer:", 10, True, False, 2, "exact_match", load_infbench,
          score_choice, extra={**BOOK_LIMITS, "file": "longbook_choice_eng.jsonl"}),
    _task("infbench_sum_eng", "summ", INFBENCH_SUM_USER, "Summary:", 1200, True, False, 2, "judge_f1", load_infbench,
          score_rouge, separator="\n\n", judged=True, fallback_metric="rougeLsum_f1",
          # HELMET scores it with default_post_process, parsing after "Answer:" although the prompt ends "Summary:"
          extra={**BOOK_LIMITS, "file": "longbook_sum_eng.jsonl", "helmet_score": score_qa}),
    _task("multi_lexsum", "summ", LEXSUM_USER, "Summary:", 400, True, False, 2, "judge_f1", load_multi_lexsum,
          score_rouge, separator="\n\n", judged=True, fallback_metric="rougeLsum_f1",
          extra={"min_doc_tokens": 65536, "context_margin": 300}),
]}

from . import cite  # noqa: E402 - Cite (ALCE): its loader, metrics and citation scorer live in cite.py

TASKS.update({t.name: t for t in cite.tasks(_task)})

CATEGORIES = {"recall": "Recall", "rag": "RAG", "rerank": "Re-rank", "icl": "ICL", "longqa": "LongQA", "summ": "Summ",
              "cite": "Cite"}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"Unknown task {name!r}. Known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]
