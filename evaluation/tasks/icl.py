"""ICL: many-shot classification with labels mapped to shuffled integers, exact match of the label."""
import hashlib
import math
import os
import random
from functools import partial

from .. import metrics as M
from .common import HELMET_LENGTHS, LoadRequest, Task, helmet_shuffle, read_jsonl

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


def load_icl(task: Task, req: LoadRequest, *, label_field: str, num_labels: int, hub: str,
             split_train: bool = False) -> list:
    """`split_train`: the dataset has a train split only, which HELMET splits 90/10 with the seed (NLU)."""
    folder = os.path.join(req.data_dir, "icl")
    how = (f"HELMET reads it from the Hub: export it with `datasets`, e.g. load_dataset('{hub.split(' ')[0]}')"
           f"[split].to_json('{folder}/{task.name}_<split>.jsonl') for the train and test splits")
    train = read_jsonl(os.path.join(folder, f"{task.name}_train.jsonl"), how)
    if split_train:
        from datasets import Dataset
        split = Dataset.from_list(train).train_test_split(test_size=0.1, seed=req.seed)
        train, test = split["train"].to_list(), split["test"].to_list()
    else:
        test = read_jsonl(os.path.join(folder, f"{task.name}_test.jsonl"), how)
    if len(test) > req.max_samples:  # HELMET: shuffle, then a label-balanced subset
        test = balance_labels(helmet_shuffle(test, req.seed), label_field, req.max_samples, req.seed)
    # an explicit count is HELMET's dataset-name count (icl_trec_coarse_200shot_balance); null: HELMET's for the length
    shots = icl_shots(task.name, req.length) if req.shots is None else req.shots
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


TASKS = [Task(name=name, category="icl", user_template=ICL_USER, system_template="label:", generation_max_length=20,
              use_chat_template=False, stop_newline=True, shots=None, primary_metric="exact_match",
              load=partial(load_icl, label_field=label_field, num_labels=num_labels, hub=hub,
                           split_train=name == "icl_nlu"),
              score=score_icl, default_max_samples=500)
         for name, (label_field, num_labels, hub, _) in ICL_DATASETS.items()]
