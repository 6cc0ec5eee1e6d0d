"""Generated recall inputs, and the whole pipeline on a tiny random Llama on CPU."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from helpers import make_model, make_tokenizer
from transformers import TrainerControl, TrainerState, TrainingArguments

from evaluation import evaluate
from evaluation.callback import RecallEvalCallback
from evaluation.generation import HFGenerator, PromptBuilder
from evaluation.synthetic import stable_seed
from evaluation.tasks import DataFileMissing, LoadRequest, get_task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "helmet")
RECALL = ["json_kv", "passkey", "passkey_word", "ruler_mk_needle", "ruler_mk_uuid", "ruler_mv"]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny_llama")
    make_model(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def recall_samples(tokenizer, name, length, seed=42, samples=3, depths=3):
    task = get_task(name)
    request = LoadRequest(length=length, input_budget=length - task.generation_max_length, max_samples=samples,
                          seed=seed, shots=task.shots, data_dir="unused", num_depths=depths,
                          count_tokens=PromptBuilder(tokenizer).count(task, False))
    return task, request, task.load(task, request)


# ---------------------------------------------------------------------------------------------
# generated recall inputs

@pytest.mark.parametrize("name", RECALL)
@pytest.mark.parametrize("length", [16384, pytest.param(32768, marks=pytest.mark.slow)])
def test_generated_input_has_requested_length_and_needle_depth(tokenizer, name, length):
    task, request, samples = recall_samples(tokenizer, name, length)
    builder = PromptBuilder(tokenizer)
    for sample in samples:
        ids = builder.ids(task, sample, False)
        assert abs(len(ids) - request.input_budget) <= 0.01 * request.input_budget
        assert len(ids) <= request.input_budget  # nothing will be cut
        # needle depth: tokens of context before the needle / tokens of the whole context
        context = sample["context"]
        before = context[:context.index(sample["needle"])]
        depth = len(tokenizer(before)["input_ids"]) / len(tokenizer(context)["input_ids"])
        assert depth == pytest.approx(sample["depth"], abs=0.02), (name, sample["depth"], depth)
        assert all(a in context for a in sample["answer"])
    assert [s["depth"] for s in samples] == [0.0, 0.5, 1.0]


def test_same_seed_gives_byte_identical_inputs_and_another_seed_differs(tokenizer):
    for name in RECALL:
        first = json.dumps(recall_samples(tokenizer, name, 4096)[2])
        assert first == json.dumps(recall_samples(tokenizer, name, 4096)[2])
        assert first != json.dumps(recall_samples(tokenizer, name, 4096, seed=7)[2])


def test_seeds_do_not_depend_on_python_hash_randomisation():
    # a fixed value: sha256-based, so PYTHONHASHSEED cannot change it
    assert stable_seed("json_kv", 8192, 0, 42) == stable_seed("json_kv", 8192, 0, 42)
    code = ("from evaluation.synthetic import build_json_kv, stable_seed;"
            "print(build_json_kv(stable_seed('json_kv', 8192, 0, 42), 5, 0.5)['context'])")
    outputs = {subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "PYTHONHASHSEED": hs}).stdout for hs in ("1", "2")}
    assert len(outputs) == 1 and "JSON data" in outputs.pop()


def test_truncation_cuts_only_the_end_of_the_context(tokenizer):
    task = get_task("kilt_nq")
    sample = {"context": "Document (Title: A): " + "alpha beta gamma " * 200, "question": "who?", "demos": "DEMO\n\n",
              "answer": ["x"]}
    ids, cut = PromptBuilder(tokenizer).truncated_ids(task, sample, False, 300)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert len(ids) <= 300 and cut > 0
    assert text.startswith("Use the given documents") and "DEMO\n\nDocument (Title: A): alpha beta" in text
    assert text.endswith("\n\nQuestion: who?\nAnswer:")


def test_chunked_prefill_gives_the_greedy_tokens_of_an_unchunked_generate(tokenizer):
    """HFGenerator prefills long prompts through transformers' generate(prefill_chunk_size=...)."""
    model = make_model(len(tokenizer)).eval()
    for param in model.parameters():  # large weights: the greedy tokens depend on the early chunks (with the
        torch.nn.init.normal_(param, std=0.5)  # default init, the last chunk alone gave the same tokens)
    ids = tokenizer("The grass is green. " * 60)["input_ids"]
    forwards = []
    hook = model.model.register_forward_pre_hook(lambda module, args, kwargs: forwards.append(kwargs["input_ids"].shape[1]),
                                                 with_kwargs=True)
    try:
        chunked = HFGenerator(model, tokenizer, prefill_chunk_size=64).generate(ids, 8, False)
    finally:
        hook.remove()
    assert forwards[:5] == [64, 64, 64, 64, len(ids) - 256] and set(forwards[5:]) == {1}  # 4 full chunks + rest
    assert chunked == HFGenerator(model, tokenizer, prefill_chunk_size=0).generate(ids, 8, False)
    assert chunked == HFGenerator(model, tokenizer, prefill_chunk_size=100).generate(ids, 8, False)
    assert chunked != HFGenerator(model, tokenizer, prefill_chunk_size=0).generate(ids[256:], 8, False)  # context counts


# ---------------------------------------------------------------------------------------------
# the pipeline on a tiny random model

@pytest.mark.slow
def test_recall_pipeline_writes_predictions_scores_report_and_plots(model_dir, tmp_path):
    out = tmp_path / "run"
    scores = evaluate(model_dir, tasks=RECALL, lengths=[512, 1024, 4096], output_dir=str(out), max_samples=2,
                      generation_max_length=16,
                      num_depths=2)
    for name in RECALL:
        for length in (512, 1024):
            lines = (out / "predictions" / f"{name}_{length}.jsonl").read_text().splitlines()
            assert len(lines) == 2
            record = json.loads(lines[0])
            assert record["input_tokens"] <= length - 16
            assert record["truncated_tokens"] == 0
    # 4096 is beyond the model's 2048-token window: reported, not run
    beyond = [r for r in scores["results"] if r["length"] == 4096]
    assert beyond and all(r["status"] == "beyond_window" and "2048" in r["message"] for r in beyond)
    assert not (out / "predictions" / "json_kv_4096.jsonl").exists()
    saved = json.loads((out / "scores.json").read_text())
    assert set(saved["categories"]["recall"]) == {"512", "1024"}
    report = (out / "report.md").read_text()
    assert "| Recall |" in report and "beyond window" in report
    for plot in ("score_vs_length.png", "recall_depth_heatmap.png"):
        assert (out / "plots" / plot).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_data_tasks_read_helmet_formats(model_dir, tmp_path):
    scores = evaluate(model_dir, tasks=["kilt_nq", "msmarco_rerank_psg", "icl_trec_coarse", "infbench_choice_eng"],
                      lengths=[1024], output_dir=str(tmp_path), max_samples=2, data_dir=FIXTURES, plots=False,
                      mode="fixed")  # fixed: RAG stops at a newline (HELMET never does)
    by_task = {r["task"]: r for r in scores["results"]}
    assert {r["status"] for r in by_task.values()} == {"ok"}
    assert by_task["msmarco_rerank_psg"]["metric"] == "NDCG@10"
    assert by_task["infbench_choice_eng"]["use_chat_template"] is True  # QA runs with the chat template
    assert by_task["kilt_nq"]["use_chat_template"] is False and by_task["kilt_nq"]["stop_newline"] is True
    record = json.loads((tmp_path / "predictions" / "kilt_nq_1024.jsonl").read_text().splitlines()[0])
    assert "\n" not in record["output"]  # the newline stop is honoured
    # the demo sampling is deterministic: same prompt inputs twice
    task = get_task("kilt_nq")
    request = LoadRequest(length=1024, input_budget=1004, max_samples=3, seed=42, shots=2, data_dir=FIXTURES)
    first = task.load(task, request)
    assert first == task.load(task, request) and first[0]["demos"].count("Question: demo question") == 2


def test_missing_data_file_says_where_to_download(model_dir, tmp_path):
    with pytest.raises(DataFileMissing, match="huggingface.co/datasets/princeton-nlp/HELMET"):
        evaluate(model_dir, tasks=["kilt_nq"], lengths=[1024], output_dir=str(tmp_path), data_dir=str(tmp_path))
    with pytest.raises(DataFileMissing, match="CogComp/trec"):
        evaluate(model_dir, tasks=["icl_trec_fine"], lengths=[1024], output_dir=str(tmp_path), data_dir=str(tmp_path))


def test_unknown_task_and_unknown_option_are_clear_errors(model_dir, tmp_path):
    with pytest.raises(ValueError, match="Unknown task 'json_kvv'.*json_kv"):
        evaluate(model_dir, tasks=["json_kvv"], lengths=[512], output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="Unknown config key"):
        evaluate(model_dir, tasks=["json_kv"], lengths=[512], output_dir=str(tmp_path), max_sample=3)
    cli = subprocess.run([sys.executable, "-m", "evaluation.run", "--model", model_dir, "--max_sample", "3"],
                         cwd=REPO, capture_output=True, text=True)
    assert cli.returncode != 0 and "unknown option(s) --max_sample" in cli.stderr


def test_model_that_emits_nothing_scores_zero(tokenizer, tmp_path):
    silent = make_model(len(tokenizer), silent=True)
    scores = evaluate(silent, tokenizer=tokenizer, tasks=["json_kv", "ruler_mv"], lengths=[512], max_samples=2,
                      output_dir=str(tmp_path), plots=False)
    assert [r["score"] for r in scores["results"]] == [0.0, 0.0]
    record = json.loads((tmp_path / "predictions" / "json_kv_512.jsonl").read_text().splitlines()[0])
    assert record["output"] == ""


def test_interrupted_run_resumes_skipping_done_samples(model_dir, tmp_path):
    kwargs = dict(tasks=["json_kv"], lengths=[512], output_dir=str(tmp_path), max_samples=3, plots=False,
                  generation_max_length=16)
    evaluate(model_dir, **kwargs)
    path = tmp_path / "predictions" / "json_kv_512.jsonl"
    lines = path.read_text().splitlines()
    kept = json.loads(lines[0])
    kept["output"] = "MARKER"  # a rerun that redid this sample would overwrite it
    # simulate an interruption: one complete sample, then a line torn mid-write
    path.write_text(json.dumps(kept) + "\n" + lines[1][:25])
    scores = evaluate(model_dir, **kwargs)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in records] == [json.loads(line)["id"] for line in lines]
    assert records[0]["output"] == "MARKER" and scores["results"][0]["n"] == 3


@pytest.mark.slow
def test_cli_and_compare(model_dir, tmp_path):
    for name in ("a", "b"):
        run = subprocess.run([sys.executable, "-m", "evaluation.run", "--config", "evaluation/configs/recall.yaml",
                              "--model", model_dir, "--lengths", "512", "--max_samples", "1", "--tasks", "json_kv",
                              "--plots", "false", "--generation_max_length", "8", "--output_dir", str(tmp_path / name)],
                             cwd=REPO, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
    table = subprocess.run([sys.executable, "-m", "evaluation.compare", str(tmp_path / "a"), str(tmp_path / "b")],
                           cwd=REPO, capture_output=True, text=True).stdout
    assert "| a | helmet | 512 |" in table and "| b | helmet | 512 |" in table and "Recall" in table


def test_callback_evaluates_on_save_and_restores_train_mode(tokenizer, tmp_path):
    model = make_model(len(tokenizer)).train()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    state = TrainerState(global_step=5)
    os.makedirs(tmp_path / "checkpoint-5")
    callback = RecallEvalCallback(lengths=[512], tasks=["json_kv"], num_samples=2, generation_max_length=16)
    callback.on_save(args, state, TrainerControl(), model=model, processing_class=tokenizer)
    assert model.training
    assert "eval_recall/json_kv_512" in state.log_history[-1] and state.log_history[-1]["step"] == 5
    assert json.loads((tmp_path / "checkpoint-5" / "recall_eval" / "scores.json").read_text())["results"][0]["n"] == 2


def test_rerank_demonstrations_follow_helmet_when_the_demo_file_holds_the_test_queries(tmp_path):
    """HELMET's k10 demo file contains the test queries themselves (TREC DL'19): removing every
    test query would leave no demonstration, so HELMET removes only each sample's own query."""
    from evaluation.tasks import LoadRequest, get_task

    def row(q):
        ctxs = [{"id": str(i), "text": f"passage {i} of {q}", "label": i % 3} for i in range(1, 6)]
        return json.dumps({"qid": q, "query": f"query {q}", "ctxs": ctxs})

    (tmp_path / "msmarco").mkdir()
    rows = "\n".join(row(f"q{i}") for i in range(6)) + "\n"  # the same queries in both files
    for k in (10, 14):
        (tmp_path / "msmarco" / f"test_reranking_data_k{k}_dep3.jsonl").write_text(rows)
    task = get_task("msmarco_rerank_psg")
    request = LoadRequest(length=4096, input_budget=4000, max_samples=100, seed=42, shots=2, data_dir=str(tmp_path))
    samples = task.load(task, request)
    assert len(samples) == 6
    for sample in samples:
        demo_queries = re.findall(r"Query: (query q\d)\nRanking", sample["demos"])
        assert len(demo_queries) == 2 and f"query {sample['id']}" not in demo_queries


def test_longqa_and_summary_demonstrations_are_deterministic_and_never_the_sample_itself(tmp_path):
    from evaluation.tasks import LoadRequest, get_task

    from conftest import train_tiny_tokenizer
    book = " the" * 66_000  # HELMET keeps Multi-LexSum cases of at least 65,536 tokens
    rows = [{"id": f"c{i}", "sources": [book], "summary/short": f"short {i}", "summary/long": f"long {i}"}
            for i in range(6)]
    (tmp_path / "multi_lexsum").mkdir()
    for split in ("validation", "train"):
        (tmp_path / "multi_lexsum" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task("multi_lexsum")
    # `fixed` mode's guarantee; `helmet` draws from the whole train split, as HELMET (which may hold the case)
    request = LoadRequest(length=1024, input_budget=600, max_samples=6, seed=42, shots=2, data_dir=str(tmp_path),
                          length_tokenizer=train_tiny_tokenizer(), mode="fixed")
    samples = task.load(task, request)
    assert [s["demo"] for s in samples] == [s["demo"] for s in task.load(task, request)]
    for sample in samples:
        shown = re.findall(r"Summary: (short \d)", sample["demo"])
        assert len(shown) == 2 and f"short {sample['id'][1:]}" not in shown


@pytest.mark.slow
def test_every_setting_is_one_yaml_key_and_one_flag_with_its_help(tmp_path):
    """EvalSettings is the one list of settings: `evaluation.run --help` shows each field's help text,
    a YAML file and a --flag set it, and a flag's string is read as the field declares (text kept,
    comma lists split, other values parsed as YAML scalars)."""
    import dataclasses

    from evaluation.config import EvalSettings, load_config
    from evaluation.run import parse_args
    help_text = " ".join(subprocess.run([sys.executable, "-m", "evaluation.run", "--help"], cwd=REPO, check=True,
                                        capture_output=True, text=True,
                                        env={**os.environ, "COLUMNS": "100000"}).stdout.split())  # no wrapping
    for setting in dataclasses.fields(EvalSettings):
        assert f"--{setting.name} " in help_text and " ".join(setting.metadata["help"].split()) in help_text
    config = tmp_path / "c.yaml"
    config.write_text("seed: 7\ndata_dir: '001'\n")
    path, overrides = parse_args(["--config", str(config), "--tokenizer", "true", "--shots", "3", "--resume", "false",
                                  "--lengths", "1k,2k", "--tasks", "json_kv,kilt_nq"])
    cfg = load_config(path, overrides)
    assert (cfg["seed"], cfg["data_dir"], cfg["tokenizer"], cfg["shots"], cfg["resume"]) == (7, "001", "true", 3, False)
    assert (cfg["lengths"], cfg["tasks"]) == ([1024, 2048], ["json_kv", "kilt_nq"])
    assert set(cfg) == {f.name for f in dataclasses.fields(EvalSettings)}
