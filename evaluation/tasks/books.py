"""What LongQA and summarisation share: long documents (books, legal cases) filtered by length and cut
at the end to fit (HELMET's `filter_length`, `truncate_llama2`), seeded demonstrations, InfiniteBench."""
import hashlib
import os
import random
from functools import lru_cache
from typing import Callable

import numpy as np

from .. import synthetic
from .common import TRUNCATION_MARKER, LoadRequest, Task, helmet_shuffle, read_jsonl

# HELMET's LongQA/Summ limits (data.py, scripts/generate_configs.py): documents of at least 65,536
# tokens (NarrativeQA: over 131,072), context cut to length - generation - 200 tokens
BOOK_LIMITS = {"min_doc_tokens": 65536, "context_margin": 200}
INFBENCH_HOW = ("download the InfiniteBench file from https://huggingface.co/datasets/xinrongzhang2022/InfiniteBench "
                "(longbook_*.jsonl) into {folder}")


def pick_demos(pool: list, exclude_id, count: int, seed: int) -> list:
    """`fixed` mode's demonstrations: seeded per sample, never the sample itself."""
    pool = [p for p in pool if p["id"] != exclude_id]
    return random.Random(synthetic.stable_seed(exclude_id, seed)).sample(pool, min(count, len(pool)))


def helmet_global_shuffles(seed: int, draws: list[int], pool_size: int, count: int) -> dict[int, list[int]]:
    """HELMET's NarrativeQA / Multi-LexSum demonstrations: `train.shuffle().select(range(count))` once per
    row, with no seed, inside one `Dataset.map`. datasets then seeds a `default_rng` permutation with the
    next word of numpy's global generator and steps it once; HELMET seeds that generator with `seed`
    (transformers' set_seed) when it loads the model, and datasets' cache hands every later length the
    map computed first (tests/fixtures/helmet/README.md). {draw index: the `count` pool indices}."""
    state, wanted, out = np.random.RandomState(seed), set(draws), {}
    for index in range(max(draws, default=-1) + 1):
        _, words, position, *_ = state.get_state()
        word = words[position] if position < 624 else words[0]  # datasets' Dataset.shuffle, verbatim logic
        state.random_sample()
        if index in wanted:
            out[index] = np.random.default_rng(word).permutation(pool_size)[:count].tolist()
    return out


def add_demos(test: list, train: list, req: LoadRequest, render: Callable[[list], str], draws: list[int]) -> None:
    """Each test sample's `demo` field: `render` of its demonstrations, or ''. `helmet` mode: HELMET's
    draw number `draws[i]` (the row's position in HELMET's map); `fixed`: seeded per sample."""
    if req.shots <= 0 or not train:
        for sample in test:
            sample["demo"] = ""
        return
    if req.mode == "helmet":
        shuffles = helmet_global_shuffles(req.seed, draws, len(train), min(req.shots, len(train)))
        for sample, draw in zip(test, draws):
            sample["demo"] = render([train[i] for i in shuffles[draw]])
    else:
        for sample in test:
            sample["demo"] = render(pick_demos(train, sample["id"], req.shots, req.seed))


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

    def __init__(self, task: Task, req: LoadRequest, min_doc_tokens: int, context_margin: int):
        tokenizer = req.length_tokenizer
        if tokenizer is None:
            raise ValueError(f"{task.name}: LoadRequest.length_tokenizer is needed to apply HELMET's document "
                             "length filter and context cut (pass the model's tokenizer or a tokenizer name)")
        self.tokenizer = _tokenizer_by_name(tokenizer) if isinstance(tokenizer, str) else tokenizer
        # the context keeps this many tokens (HELMET's dataset-name suffix: length - generation - 200;
        # Multi-LexSum length - 400 - 300), the rest is replaced by TRUNCATION_MARKER
        self.context_tokens = req.input_budget - context_margin
        # truncate_llama2 keeps the text up to the end of this token (its tokens include the marker's)
        self.cut_index = self.context_tokens - len(self.tokenizer(TRUNCATION_MARKER)["input_ids"])
        # HELMET keeps documents of at least `min_doc_tokens` at every length; `fixed` also asks for
        # a full context, so beyond 128K every prompt is as long as its nominal length
        self.min_tokens = min_doc_tokens
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


def infbench_sample(row: dict) -> dict:
    return {"id": row["id"], "context": row["context"], "question": row["input"], "demo": "", "answer": row["answer"]}


def infbench_choice_sample(row: dict) -> dict:
    """Multiple choice: the options as "A. ..." lines; gold answers the letter and "letter. text"."""
    letter = chr(ord("A") + row["options"].index(row["answer"][0]))
    return {**infbench_sample(row), "options": "A. {}\nB. {}\nC. {}\nD. {}".format(*row["options"]),
            "answer": [letter, f"{letter}. {row['answer'][0]}"]}


def load_infbench(task: Task, req: LoadRequest, *, file: str, demo: Callable[[dict], str],
                  row_to_sample: Callable[[dict], dict] = infbench_sample, keypoints_file: str | None = None) -> list:
    """InfiniteBench `file`; `demo` renders one demonstration; `keypoints_file` (HELMET's, optional) holds
    the key points the summarisation judge needs."""
    folder = os.path.join(req.data_dir, "infbench")
    rows = read_jsonl(os.path.join(folder, file), INFBENCH_HOW.format(folder=folder))
    samples = [row_to_sample(row) for row in rows]
    # HELMET: demonstrations from the whole file, then the length filter and cut, then shuffle + select
    ruler = LengthRuler(task, req, **BOOK_LIMITS)
    kept = [s for s in samples if ruler.long_enough(s["context"])]
    ruler.check_any(kept, os.path.join(folder, file))
    chosen = [{**s, "context": ruler.cut(s["context"])} for s in helmet_shuffle(kept, req.seed)[:req.max_samples]]
    if keypoints_file:
        keypoints = keypoints_by_id(os.path.join(folder, keypoints_file), "keypoints")
        for sample in chosen:
            sample["keypoints"] = keypoints.get(str(sample["id"]))
    if req.shots > 0:
        for sample in chosen:
            demos = helmet_shuffle([s for s in samples if s["id"] != sample["id"]], req.seed)[:req.shots]
            text = "\n\n".join(map(demo, demos))
            sample["demo"] = f"For example:\n\n{text}\n\nNow, read the following story:\n\n"
    return [{**s, "id": str(s["id"])} for s in chosen]


def keypoints_by_id(path: str, key: str) -> dict:
    """{id: key points} from one of HELMET's key-point files; {} when the file is absent (judge then skips)."""
    if not os.path.exists(path):
        return {}
    return {str(r["id"]): r[key] for r in read_jsonl(path) if r.get(key)}
