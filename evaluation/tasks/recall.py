"""Recall: JSON key-value retrieval and RULER needles: HELMET's released files where the data directory
has them (`helmet` mode), else generated in code (`synthetic.py`) for any length and tokenizer."""
import logging
import os

from .. import metrics as M
from .. import synthetic
from .common import HELMET_LENGTHS, LoadRequest, Task, helmet_shuffle, read_jsonl

logger = logging.getLogger(__name__)

# HELMET's data release (its scripts/generate_configs.py): one file per HELMET length
JSON_KV_FILES = dict(zip(HELMET_LENGTHS, (f"json_kv/test_k{k}_dep6.jsonl" for k in (50, 105, 220, 440, 900, 1800))))


def ruler_files(folder: str) -> dict:
    return {length: f"ruler/{folder}/validation_{length}.jsonl" for length in HELMET_LENGTHS}

RULER_SINGLE_USER = ("A special magic {type_needle_v} is hidden within the following text. Make sure to memorize it. "
                     "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
                     "What is the special magic {type_needle_v} for {query} mentioned in the provided text?")
RULER_SINGLE_SYSTEM = "The special magic {type_needle_v} for {query} mentioned in the provided text is"
RULER_MULTI_USER = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
                    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
                    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?")
RULER_MULTI_SYSTEM = "The special magic {type_needle_v} for {query} mentioned in the provided text are"
PASSKEY_USER = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                "I will quiz you about the important information there.\n{context}\nWhat is the pass key?")
JSON_KV_USER = ("{context}\n\nExtract the value corresponding to the specified key in the JSON object below.\n\n"
                "{demos}Key: {question}")


def released_file(task: Task, mode: str, data_dir: str, length: int) -> str | None:
    """The name of HELMET's released file that `helmet` mode reads for this length, if the data directory
    holds it (else the samples are generated)."""
    relative = task.extra.get("helmet_files", {}).get(length)
    if mode != "helmet" or relative is None:
        return None
    path = os.path.join(data_dir, relative)
    return relative if os.path.exists(path) or os.path.exists(path + ".gz") else None


def helmet_file(task: Task, req: LoadRequest) -> str | None:
    """HELMET's released file for this length when `helmet` mode runs and the data directory holds it."""
    relative = released_file(task, req.mode, req.data_dir, req.length)
    if relative is None and req.mode == "helmet" and req.length in task.extra.get("helmet_files", {}):
        logger.info("%s at %d: %s is not in the data directory; generating the samples instead", task.name,
                    req.length, task.extra["helmet_files"][req.length])
    return None if relative is None else os.path.join(req.data_dir, relative)


def load_recall(task: Task, req: LoadRequest) -> list:
    path = helmet_file(task, req)
    if path is None:
        return load_synthetic(task, req)
    rows = helmet_shuffle(read_jsonl(path), req.seed)[:req.max_samples]  # HELMET: shuffle(seed).select(...)
    return [{**task.extra["from_file"](row, req.shots), "id": f"{task.name}-{req.length}-{row.get('index', i)}"}
            for i, row in enumerate(rows)]


def json_kv_from_file(row: dict, shots: int) -> dict:
    """HELMET's load_json_kv: `demos` holds [key, value] pairs, of which the first `shots` are shown."""
    demos = "\n\n".join(f"Key: {key}\nCorresponding value: {value}" for key, value in row["demos"][:shots])
    return {"context": row["context"], "question": row["question"], "answer": row["answer"],
            "demos": demos + ("\n\n" if shots > 0 else "")}


def ruler_from_file(row: dict, shots: int) -> dict:
    """HELMET's load_ruler: the row's own fields fill the template (`query`, `type_needle_v`, ...)."""
    return {**row, "question": row.get("query", row.get("question", "")),
            "example": row["example"] + "\n\n" if row.get("example") else "",
            "answer": row["answer"] if "answer" in row else row["outputs"]}


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


def _recall_task(name: str, user: str, system: str, generation: int, metric: str, score, shots: int | None = None,
                 helmet_files: dict | None = None, from_file=ruler_from_file) -> Task:
    """`shots`: JSON KV's demonstrations (the needle tasks take none, so setting `shots` for them is refused);
    `helmet_files`: HELMET's released file per length."""
    return Task(name=name, category="recall", user_template=user, system_template=system,
                generation_max_length=generation, use_chat_template=False, stop_newline=False, shots=shots or 0,
                primary_metric=metric, load=load_recall, score=score, unread_settings=() if shots else ("shots",),
                extra={"builder": name, "helmet_files": helmet_files or {}, "from_file": from_file})


TASKS = [
    _recall_task("json_kv", JSON_KV_USER, "Corresponding value:", 100, "substring_exact_match", score_json_kv, shots=2,
                 helmet_files=JSON_KV_FILES, from_file=json_kv_from_file),
    # passkey: the classic context-extension check; passkey_word (a one-noun key) is the micro-ProLong demo's
    _recall_task("passkey", PASSKEY_USER, "The pass key is", 12, "ruler_recall", score_ruler),
    _recall_task("passkey_word", PASSKEY_USER, "The pass key is", 6, "ruler_recall", score_ruler),
    _recall_task("ruler_mk_needle", RULER_SINGLE_USER, RULER_SINGLE_SYSTEM, 50, "ruler_recall", score_ruler,
                 helmet_files=ruler_files("niah_multikey_2")),
    _recall_task("ruler_mk_uuid", RULER_SINGLE_USER, RULER_SINGLE_SYSTEM, 100, "ruler_recall", score_ruler,
                 helmet_files=ruler_files("niah_multikey_3")),
    _recall_task("ruler_mv", RULER_MULTI_USER, RULER_MULTI_SYSTEM, 50, "ruler_recall", score_ruler,
                 helmet_files=ruler_files("niah_multivalue")),
]
