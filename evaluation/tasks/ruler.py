"""RULER (NVIDIA/RULER, arXiv 2404.06654): its 13 tasks with RULER's own samples and metrics.

Samples come from `ruler_generators` (RULER's generators, same draws for the same seed and tokenizer: every
(task, length) is one RULER run of `max_samples` samples); the prompt is RULER's input followed by its answer
prefix, as RULER's pred/call_api.py sends it; the score is RULER's string_match_all (share of the gold answers
found in the output) or string_match_part (QA: any gold answer found), after RULER's clean-up of the output.
"""
import os
import re
from dataclasses import dataclass

from . import ruler_generators as G
from .common import LoadRequest, Task

# scripts/synthetic.yaml: task name -> (generator, its arguments)
_NIAH = dict(type_needle_k="words", type_needle_v="numbers", num_needle_k=1, num_needle_v=1, num_needle_q=1)
CONFIGS = {
    "niah_single_1": (G.NeedleInAHaystack, {**_NIAH, "type_haystack": "noise"}),
    "niah_single_2": (G.NeedleInAHaystack, {**_NIAH, "type_haystack": "essay"}),
    "niah_single_3": (G.NeedleInAHaystack, {**_NIAH, "type_haystack": "essay", "type_needle_v": "uuids"}),
    "niah_multikey_1": (G.NeedleInAHaystack, {**_NIAH, "type_haystack": "essay", "num_needle_k": 4}),
    "niah_multikey_2": (G.NeedleInAHaystack, {**_NIAH, "type_haystack": "needle"}),
    "niah_multikey_3": (G.NeedleInAHaystack, {**_NIAH, "type_haystack": "needle", "type_needle_k": "uuids",
                                               "type_needle_v": "uuids"}),
    "niah_multivalue": (G.NeedleInAHaystack, {**_NIAH, "type_haystack": "essay", "num_needle_v": 4}),
    "niah_multiquery": (G.NeedleInAHaystack, {**_NIAH, "type_haystack": "essay", "num_needle_q": 4}),
    "vt": (G.VariableTracking, {"num_chains": 1, "num_hops": 4}),
    "cwe": (G.CommonWords, {"freq_cw": 30, "freq_ucw": 3, "num_cw": 10}),
    "fwe": (G.FrequentWords, {"alpha": 2.0}),
    "qa_1": (G.QuestionAnswering, {"dataset": "squad"}),
    "qa_2": (G.QuestionAnswering, {"dataset": "hotpotqa"}),
}
_CONTROL = re.compile(r"[\x00-\x1f]")


def clean_prediction(text: str) -> str:
    """RULER's eval/evaluate.py postprocess_pred: strip, control characters to newlines, strip."""
    return _CONTROL.sub("\n", text.strip()).strip()


def string_match_all(prediction: str, references: list) -> float:
    """RULER's string_match_all for one sample, 0-1: the share of references found (case-insensitive)."""
    prediction = clean_prediction(prediction).lower()
    return sum(r.lower() in prediction for r in references) / len(references)


def string_match_part(prediction: str, references: list) -> float:
    """RULER's string_match_part for one sample, 0-1: 1 if any reference is found (case-insensitive)."""
    prediction = clean_prediction(prediction).lower()
    return float(max(r.lower() in prediction for r in references))


def split_input(record: dict) -> dict:
    """RULER's input as prefix + context + suffix, so that an over-long prompt (a chat template, a BOS token)
    loses the end of the haystack only."""
    text, context = record["input"], record["context"]
    start = text.rfind(context) if context else -1
    if start < 0:
        return {"prefix": text, "context": "", "suffix": ""}
    return {"prefix": text[:start], "context": context, "suffix": text[start + len(context):]}


def length_tokenizer(req: LoadRequest):
    tokenizer = req.length_tokenizer
    if tokenizer is None:
        raise ValueError("RULER tasks fit samples with the model's tokenizer; LoadRequest.length_tokenizer is unset")
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    return tokenizer


_PREPARED: dict = {}  # (task, length, seed, data, tokenizer, generation budget) -> a generator after its size search
_PREPARED_KEPT = 64


def prepared_generator(name: str, req: LoadRequest) -> G.Generator:
    """A RULER generator after its size search (a dozen tokenizations of a full-length input): the runner loads
    every task once to check its data before loading it to run, and both draw the same samples from here."""
    tokenizer = length_tokenizer(req)
    key = (name, req.length, req.seed, os.path.abspath(req.data_dir), id(tokenizer), req.length - req.input_budget)
    if key not in _PREPARED:
        generator_class, arguments = CONFIGS[name]
        generator = generator_class(tokenizer, req.length, req.seed, req.data_dir,
                                    tokens_to_generate=req.length - req.input_budget, **arguments)
        generator.prepare()
        if len(_PREPARED) >= _PREPARED_KEPT:
            _PREPARED.pop(next(iter(_PREPARED)))
        _PREPARED[key] = generator  # it holds the tokenizer, so id(tokenizer) names no other tokenizer meanwhile
    return _PREPARED[key].fork()


def load_ruler(task: "RulerTask", req: LoadRequest) -> list[dict]:
    """One RULER run: `max_samples` samples for the model's tokenizer, fitted to `length` with the generation
    budget left free (RULER's max_seq_length and tokens_to_generate)."""
    generator = prepared_generator(task.extra["ruler_task"], req)
    samples = []
    for index in range(req.max_samples):
        record = generator.draw()
        samples.append({"id": f"{task.name}-{req.length}-{index}", "input": record["input"],
                        "answer": record["outputs"], "answer_prefix": record["answer_prefix"],
                        "ruler_length": record["length"], **split_input(record)})
    return samples


def score_all(output: str, sample: dict) -> dict:
    return {"string_match_all": string_match_all(output, sample["answer"])}


def score_part(output: str, sample: dict) -> dict:
    return {"string_match_part": string_match_part(output, sample["answer"])}


@dataclass(frozen=True, kw_only=True)
class RulerTask(Task):
    """RULER scores the generated text alone: its answer prefix is not put back (" Answer:" holds "an")."""

    def score_output(self, output: str, sample: dict, use_chat_template: bool, mode: str = "helmet") -> dict:
        return self.score(output, sample)


def _task(name: str) -> RulerTask:
    generator_class, _ = CONFIGS[name]
    qa = generator_class is G.QuestionAnswering
    return RulerTask(name=f"ruler_{name}", category="ruler", user_template="{prefix}{context}{suffix}",
                     system_template="{answer_prefix}", separator="",
                     generation_max_length=G.TOKENS_TO_GENERATE[generator_class.kind], use_chat_template=False,
                     stop_newline=False, shots=0, primary_metric="string_match_part" if qa else "string_match_all",
                     load=load_ruler, score=score_part if qa else score_all, default_max_samples=500,
                     answer_prefix_in_chat=True, extra={"ruler_task": name})


TASKS = [_task(name) for name in CONFIGS]
