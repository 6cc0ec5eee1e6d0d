"""What every task category shares: the Task record, the load request, HELMET's file reading,
seeding and subsampling helpers."""
import gzip
import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

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
    shots: int | None                # None: the task's own count (ICL: HELMET's shots for the length)
    data_dir: str
    num_depths: int = 11
    count_tokens: Callable[[dict], int] | None = None  # renders fields with the task's template
    mode: str = "helmet"             # helmet | fixed (config key `mode`; docs/evaluation.md)
    # tokenizer (or a name for AutoTokenizer) that measures LongQA/Summ documents for HELMET's
    # length filters and context cut; HELMET uses meta-llama/Llama-2-7b-hf for every model
    length_tokenizer: object = None


@dataclass(frozen=True, kw_only=True)
class Task:
    """One HELMET task; each category module builds its tasks with keyword arguments."""
    name: str
    category: str
    user_template: str
    system_template: str             # the answer prefix ("Answer:"), appended after `separator`
    generation_max_length: int
    use_chat_template: bool          # HELMET: off for Recall/RAG/Re-rank/ICL, on for QA/Summ/Cite
    stop_newline: bool               # HELMET's configs meant these; its code never applied them
    shots: int | None                # the default demonstrations; None: chosen by length (ICL)
    primary_metric: str
    load: Callable[["Task", "LoadRequest"], list]  # a category's loader, its per-task data bound with partial
    score: Callable[[str, dict], dict]  # (model output, sample) -> metrics
    separator: str = "\n"
    default_max_samples: int = 100
    judged: bool = False             # has a model-judged score (NarrativeQA, summarisation)
    judge_prompts: tuple = ()        # judge_prompts/<name>.txt the judge uses: LongQA 1, summarisation 3
    fallback_metric: str | None = None  # reported when the judge (or Cite's NLI model) is not configured
    helmet_score: Callable[[str, dict], dict] | None = None  # HELMET's scorer where `score` fixes it
    score_components: tuple = ()     # Cite: the score is the mean of these metrics (HELMET's collect_results)
    unread_settings: tuple = ()      # config keys this task ignores: setting one is refused (config.py)
    answer_prefix_in_chat: bool = False  # RULER: with a chat template, the answer prefix follows the assistant header
    extra: dict = field(default_factory=dict)  # category data (recall: `builder`; Cite: `answer_list`)

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
        `helmet` mode uses HELMET's scorer where ours fixes it (`helmet_score`)."""
        if not use_chat_template:
            output = self.answer_prefix(sample) + output
        score = self.helmet_score if mode == "helmet" and self.helmet_score else self.score
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
