"""Recall: JSON key-value retrieval and RULER needles, generated in code (`synthetic.py`)."""
from .. import metrics as M
from .. import synthetic
from .common import LoadRequest, Task

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


def _recall_task(name: str, user: str, system: str, generation: int, shots: int, metric: str, score) -> Task:
    return Task(name=name, category="recall", user_template=user, system_template=system,
                generation_max_length=generation, use_chat_template=False, stop_newline=False, shots=shots,
                primary_metric=metric, load=load_synthetic, score=score, extra={"builder": name})


TASKS = [
    _recall_task("json_kv", JSON_KV_USER, "Corresponding value:", 100, 2, "substring_exact_match", score_json_kv),
    # passkey: the classic context-extension check; passkey_word (a one-noun key) is the micro-ProLong demo's
    _recall_task("passkey", PASSKEY_USER, "The pass key is", 12, 0, "ruler_recall", score_ruler),
    _recall_task("passkey_word", PASSKEY_USER, "The pass key is", 6, 0, "ruler_recall", score_ruler),
    _recall_task("ruler_mk_needle", RULER_SINGLE_USER, RULER_SINGLE_SYSTEM, 50, 0, "ruler_recall", score_ruler),
    _recall_task("ruler_mk_uuid", RULER_SINGLE_USER, RULER_SINGLE_SYSTEM, 100, 0, "ruler_recall", score_ruler),
    _recall_task("ruler_mv", RULER_MULTI_USER, RULER_MULTI_SYSTEM, 50, 0, "ruler_recall", score_ruler),
]
