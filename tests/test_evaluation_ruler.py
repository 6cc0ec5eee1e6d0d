"""RULER's 13 tasks: our samples, prompts and scores equal those of RULER's own code (tests/fixtures/ruler/expected,
made by tests/fixtures/ruler/tools/run_ruler.py with SmolLM2's tokenizer), and the ruler config runs through the
evaluation CLI into the report and the model card's model-index."""
import glob
import gzip
import json
import os

import pytest
from helpers import make_model
from huggingface_hub import ModelCard
from transformers import AutoTokenizer

from evaluation.generation import PromptBuilder
from evaluation.run import main as evaluation_run
from evaluation.tasks import TASKS, DataFileMissing, LoadRequest, get_task
from prolong.model_card import RULER_DATASET, update_model_card

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "ruler")
DATA_DIR = os.path.join(FIXTURES, "data")
CASES = sorted(glob.glob(os.path.join(FIXTURES, "expected", "*.json.gz")))
RULER_TASKS = [name for name, task in TASKS.items() if task.category == "ruler"]


def case_param(path):
    slow = "_4096." in path  # RULER's >= 4K branches (few-shot sizes, search steps): 6 s together
    return pytest.param(path, id=os.path.basename(path)[:-len(".json.gz")], marks=[pytest.mark.slow] if slow else [])


@pytest.fixture(scope="module")
def smollm2_tokenizer(request, tmp_path_factory):
    """SmolLM2's tokenizer, kept as tokenizer.json in pytest's cache: reading it from the GGUF takes 5 s."""
    from prolong.data.tokenize import smollm2_gguf_path
    gguf = smollm2_gguf_path()
    key = f"ruler_smollm2_tokenizer_{os.path.getsize(gguf)}_{int(os.path.getmtime(gguf))}"
    cache = getattr(request.config, "cache", None)
    folder = str(cache.mkdir(key)) if cache else str(tmp_path_factory.mktemp(key))
    if not os.path.exists(os.path.join(folder, "tokenizer.json")):
        from prolong.demo.smollm2 import load_smollm2_tokenizer
        load_smollm2_tokenizer().save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def mismatches(case: dict, tokenizer) -> list[str]:
    task = get_task("ruler_" + case["task"])
    length = case["length"]
    request = LoadRequest(length=length, input_budget=length - task.generation_max_length,
                          max_samples=case["num_samples"], seed=case["seed"], shots=0, data_dir=DATA_DIR,
                          length_tokenizer=tokenizer)
    ours = task.load(task, request)
    problems = [] if len(ours) == len(case["samples"]) else [f"{len(ours)} samples, RULER {len(case['samples'])}"]
    fractions = []
    for sample, expected in zip(ours, case["samples"]):
        for our_key, key in (("input", "input"), ("answer", "outputs"), ("answer_prefix", "answer_prefix"),
                             ("ruler_length", "length")):
            if sample[our_key] != expected[key]:
                problems.append(f"{sample['id']} {key}: ours {str(sample[our_key])[:80]!r}, RULER "
                                f"{str(expected[key])[:80]!r}")
        # RULER's pred/call_api.py sends input + answer_prefix
        if PromptBuilder(tokenizer).text(task, sample, False)[0] != expected["input"] + expected["answer_prefix"]:
            problems.append(f"{sample['id']}: prompt differs from RULER's input + answer_prefix")
        for scored in expected["scores"]:
            fraction = task.score_output(scored["output"], sample, use_chat_template=False)[task.primary_metric]
            fractions.append(fraction)
            if round(fraction * 100, 2) != scored["score"]:
                problems.append(f"{sample['id']} score of {scored['output'][:40]!r}: ours {fraction * 100}, "
                                f"RULER {scored['score']}")
    if round(100 * sum(fractions) / len(fractions), 2) != case["task_score"]:
        problems.append(f"task score: ours {100 * sum(fractions) / len(fractions)}, RULER {case['task_score']}")
    return problems


def test_every_ruler_task_has_fixtures_at_two_lengths():
    made = {(json.load(gzip.open(p))["task"], json.load(gzip.open(p))["length"]) for p in CASES}
    assert {f"ruler_{task}" for task, _ in made} == set(RULER_TASKS) and len(RULER_TASKS) == 13
    assert all((task, length) in made for task, _ in made for length in (1024, 4096))


@pytest.mark.parametrize("path", [case_param(p) for p in CASES])
def test_samples_prompts_and_scores_equal_rulers_own(path, smollm2_tokenizer):
    with gzip.open(path, "rt") as f:
        case = json.load(f)
    assert mismatches(case, smollm2_tokenizer) == []


def test_with_a_chat_template_the_answer_prefix_follows_the_assistant_header(smollm2_tokenizer):
    """RULER's model templates end with the assistant header and then the answer prefix (prepare.py)."""
    task = get_task("ruler_qa_1")
    sample = {"prefix": "", "context": "Document 1: the sky is blue.", "suffix": "\n\nQuestion: what colour?",
              "answer_prefix": " Answer:"}
    text, has_special = PromptBuilder(smollm2_tokenizer).text(task, sample, True)
    assert has_special and text.endswith("<|im_start|>assistant\n Answer:"), text[-80:]
    assert "Document 1: the sky is blue." in text and text.count(" Answer:") == 1


def test_answer_prefix_is_not_scored():
    """RULER scores the generated text alone: " Answer:" holds the gold answer "an", an empty output scores 0."""
    task = get_task("ruler_qa_1")
    sample = {"answer": ["an"], "answer_prefix": " Answer:"}
    assert task.score_output("", sample, use_chat_template=False) == {"string_match_part": 0.0}
    assert task.score_output("\x01 AN apple", sample, use_chat_template=False) == {"string_match_part": 1.0}


def test_missing_essays_say_where_to_get_them(smollm2_tokenizer, tmp_path):
    task = get_task("ruler_niah_single_2")
    request = LoadRequest(length=1024, input_budget=896, max_samples=1, seed=42, shots=0, data_dir=str(tmp_path),
                          length_tokenizer=smollm2_tokenizer)
    with pytest.raises(DataFileMissing, match=r"ruler/PaulGrahamEssays.json.*download_paulgraham_essay.py"):
        task.load(task, request)


@pytest.mark.slow
def test_ruler_config_through_the_cli_reports_rulers_average(smollm2_tokenizer, tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    make_model(len(smollm2_tokenizer), window=1024).save_pretrained(model_dir)
    smollm2_tokenizer.save_pretrained(model_dir)
    (model_dir / "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# tiny\n")
    out = tmp_path / "out"
    evaluation_run(["--config", "evaluation/configs/ruler.yaml", "--model", str(model_dir), "--update-card",
                    str(model_dir), "--lengths", "1024",
                    "--max_samples", "1", "--generation_max_length", "4", "--data_dir", DATA_DIR, "--plots", "false",
                    "--progress", "false", "--output_dir", str(out)])
    scores = json.loads((out / "scores.json").read_text())
    assert [r["task"] for r in scores["results"]] == RULER_TASKS
    assert all(r["status"] == "ok" and r["n"] == 1 for r in scores["results"])
    assert scores["ruler"]["1024"]["tasks"] == 13
    average = sum(r["score"] for r in scores["results"]) / 13
    assert scores["ruler"]["1024"]["average"] == pytest.approx(average)
    report = (out / "report.md").read_text()
    assert "## RULER" in report and "| tasks | 13 of 13 |" in report and "| RULER |" in report
    assert "Mode: `helmet` (RULER's behaviour, comparable with published RULER numbers)" in report
    record = json.loads((out / "predictions" / "ruler_vt_1024.jsonl").read_text().splitlines()[0])
    assert "5 variables are assigned the value" in record["prompt_tail"] and record["input_tokens"] <= 1024 - 4
    update_model_card(str(model_dir), scores)  # a second update replaces RULER's results, it does not add to them
    [ruler] = ModelCard.load(model_dir / "README.md").data.eval_results
    assert (ruler.dataset_type, ruler.metric_args["input_length"], ruler.metric_value) == (RULER_DATASET, 1024,
                                                                                          round(average, 2))
