"""The runner on tiny random Llamas saved to disk: resume never mixes runs, nothing is lost, progress
and prompts are visible, callback scores reach TensorBoard."""
import json
import os
import socket

import pytest
from test_evaluation import make_model, make_tokenizer

from evaluation import evaluate
from evaluation.runner import EvaluationError
from evaluation.synthetic import needle_depths
from evaluation.tasks import DataFileMissing

FAST = dict(tasks=["json_kv"], lengths=[256], max_samples=2, generation_max_length=8, plots=False, progress=False)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _save_model(path, tokenizer, seed):
    import torch
    model = make_model(len(tokenizer))
    torch.manual_seed(seed)
    for param in model.parameters():  # another random model of the same architecture
        torch.nn.init.normal_(param, std=0.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("models")
    return _save_model(root / "a", tokenizer, 1), _save_model(root / "b", tokenizer, 2)


def _outputs(out, name="json_kv_256"):
    return [json.loads(line)["output"] for line in (out / "predictions" / f"{name}.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_model_b_never_gets_model_a_predictions(models, tmp_path):
    model_a, model_b = models
    out = tmp_path / "shared"
    evaluate(model_a, output_dir=str(out), **FAST)
    a_outputs = _outputs(out)
    evaluate(model_b, output_dir=str(tmp_path / "fresh"), **FAST)
    b_outputs = _outputs(tmp_path / "fresh")
    assert a_outputs != b_outputs  # the two models answer differently
    with pytest.raises(EvaluationError, match=r"(?s)json_kv_256.jsonl was written by another run.*model_fingerprint"):
        evaluate(model_b, output_dir=str(out), **FAST)  # resume is on by default: refused, not reused
    assert _outputs(out) == a_outputs  # and A's predictions are untouched
    scores = evaluate(model_b, output_dir=str(out), resume=False, **FAST)
    assert _outputs(out) == b_outputs and scores["identity"]["model"] == os.path.abspath(model_b)
    # a setting that changes the score is part of the key too
    with pytest.raises(EvaluationError, match="generation_max_length: 8 .* vs 9"):
        evaluate(model_b, output_dir=str(out), **{**FAST, "generation_max_length": 9})
    # the same model and settings resume (nothing regenerated: the file is unchanged)
    before = (out / "predictions" / "json_kv_256.jsonl").read_bytes()
    evaluate(model_b, output_dir=str(out), **FAST)
    assert (out / "predictions" / "json_kv_256.jsonl").read_bytes() == before


def test_resume_refuses_samples_generated_before_helmets_file_was_added(models, tmp_path):
    """json_kv at 4096 is generated until data_dir holds HELMET's test_k50_dep6.jsonl, then read from it."""
    import shutil

    model_a, _ = models
    data, out = tmp_path / "data", str(tmp_path / "out")
    data.mkdir()
    settings = {**FAST, "lengths": [4096], "max_samples": 1, "allow_beyond_window": True, "data_dir": str(data)}
    evaluate(model_a, output_dir=out, **settings)
    shutil.copytree(os.path.join(os.path.dirname(__file__), "fixtures", "helmet", "fidelity", "json_kv"), data / "json_kv")
    with pytest.raises(EvaluationError, match=r"(?s)json_kv_4096.jsonl was written by another run.*data_file"):
        evaluate(model_a, output_dir=out, **settings)


@pytest.mark.slow
def test_report_covers_every_length_in_the_output_dir_and_names_the_mode(models, tmp_path):
    model_a, _ = models
    evaluate(model_a, output_dir=str(tmp_path), **{**FAST, "lengths": [128, 256]})
    scores = evaluate(model_a, output_dir=str(tmp_path), **{**FAST, "lengths": [512]})
    assert {r["length"] for r in scores["results"]} == {128, 256, 512}
    saved = json.loads((tmp_path / "scores.json").read_text())
    assert set(saved["categories"]["recall"]) == {"128", "256", "512"} and saved["mode"] == "helmet"
    report = (tmp_path / "report.md").read_text()
    assert "| json_kv | substring_exact_match | " in report and "| 128 | 256 | 512 |" in report
    assert "Mode: `helmet`" in report and "earlier invocation" not in report
    scores = evaluate(model_a, output_dir=str(tmp_path), **{**FAST, "lengths": [1024], "max_samples": 1})
    notes = {r["length"]: r["note"] for r in scores["results"]}
    assert notes[1024] is None and "other settings (max_samples: 2 (in the file) vs 1 (now))" in notes[128]
    (tmp_path / "predictions" / "json_kv_128.run.json").write_text("{cut")  # a damaged file is named, not dropped
    scores = evaluate(model_a, output_dir=str(tmp_path), **{**FAST, "lengths": [512]})
    assert any("json_kv_128: unreadable" in note for note in scores["left_out"])
    with pytest.raises(EvaluationError, match=r"json_kv_128.run.json: unreadable \(Expecting"):
        evaluate(model_a, output_dir=str(tmp_path), **{**FAST, "lengths": [128]})  # resuming it is refused


def test_a_failing_task_is_reported_and_the_others_still_report(models, tmp_path):
    data = tmp_path / "data" / "kilt"
    data.mkdir(parents=True)
    broken = json.dumps({"id": "q1", "question": "who?", "answers": ["x"]}) + "\n"  # no "ctxs": fails at run time
    for name in ("nq-dev-multikilt_1000_k20_dep6.jsonl", "nq-train-multikilt_1000_k3_dep6.jsonl"):
        (data / name).write_text(broken)
    scores = evaluate(models[0], output_dir=str(tmp_path / "out"), data_dir=str(tmp_path / "data"),
                      **{**FAST, "tasks": ["kilt_nq", "json_kv"]})
    status = {r["task"]: r["status"] for r in scores["results"]}
    assert status == {"kilt_nq": "failed", "json_kv": "ok"} and scores["failed"] == ["kilt_nq @ 256"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| kilt_nq |  | FAILED |" in report and "KeyError: 'ctxs'" in report
    assert json.loads((tmp_path / "out" / "scores.json").read_text())["categories"]["recall"]["256"] is not None


def test_all_missing_data_is_listed_before_the_model_loads(models, tmp_path):
    broken_model = tmp_path / "model"
    broken_model.mkdir()
    for name in os.listdir(models[0]):
        (broken_model / name).write_bytes((open(os.path.join(models[0], name), "rb")).read())
    (broken_model / "model.safetensors").write_bytes(b"not weights")  # loading the model would fail
    with pytest.raises(DataFileMissing) as error:
        evaluate(str(broken_model), output_dir=str(tmp_path / "out"), data_dir=str(tmp_path / "nodata"),
                 **{**FAST, "tasks": ["json_kv", "kilt_nq", "msmarco_rerank_psg", "icl_trec_fine"]})
    message = str(error.value)
    assert message.startswith("data missing for 3 task(s); nothing was run")
    for expected in ("nq-dev-multikilt_1000_k20_dep6.jsonl", "test_reranking_data_k14_dep3.jsonl",
                     "icl_trec_fine_train.jsonl", "princeton-nlp/HELMET", "CogComp/trec"):
        assert expected in message
    assert not (tmp_path / "out" / "predictions").exists()


@pytest.mark.slow
def test_a_judge_that_is_down_marks_the_samples_and_keeps_the_predictions(models, tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on: every judge call is refused (URLError)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tmp_path / "data" / "narrativeqa"
    folder.mkdir(parents=True)
    book = "The grass is green. " * 26300  # 131,500 tokens: HELMET keeps only books over 131,072
    rows = [{"id": f"s{i}", "context": book, "question": "What colour?", "answer": ["green"]}
            for i in range(2)]
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    scores = evaluate(models[0], output_dir=str(tmp_path / "out"), data_dir=str(tmp_path / "data"), shots=0,
                      mode="fixed", judge_base_url=f"http://127.0.0.1:{port}/v1", use_chat_template=False,
                      **{**FAST, "tasks": ["narrativeqa"], "lengths": [512]})
    result = scores["results"][0]
    assert result["status"] == "ok" and result["n"] == 2
    records = [json.loads(line) for line in (tmp_path / "out" / "predictions" / "narrativeqa_512.jsonl").read_text().splitlines()]
    assert all(r["metrics"]["judge_failed"] == 1 and r["metrics"]["judge"].startswith("failed: judge call: URLError")
               for r in records)
    assert result["metric"] == "rougeL_f1"  # no judged sample: the fallback metric, with a note
    assert "failed on 2 of 2 samples" in result["note"] and "judge skipped" not in result["note"]
    assert "failed on 2 of 2 samples" in (tmp_path / "out" / "report.md").read_text()
    # the judge is back: a rerun scores the kept outputs (nothing regenerated)
    import http.server
    import threading

    class JudgeUp(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"choices": [{"message": {"content": '{"fluency": 1, "correctness": 2}'}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass
    server = http.server.HTTPServer(("127.0.0.1", port), JudgeUp)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        scores = evaluate(models[0], output_dir=str(tmp_path / "out"), data_dir=str(tmp_path / "data"), shots=0,
                          mode="fixed", judge_base_url=f"http://127.0.0.1:{port}/v1", use_chat_template=False,
                          **{**FAST, "tasks": ["narrativeqa"], "lengths": [512]})
    finally:
        server.shutdown()
        server.server_close()
    rescored = [json.loads(line) for line in (tmp_path / "out" / "predictions" / "narrativeqa_512.jsonl").read_text().splitlines()]
    assert [(r["output"], r["seconds"]) for r in rescored] == [(r["output"], r["seconds"]) for r in records]
    assert all(r["metrics"]["judge_failed"] == 0 for r in rescored)
    assert scores["results"][0]["metric"] == "judge_score" and scores["results"][0]["score"] == pytest.approx(200 / 3)
    assert scores["results"][0]["note"] is None


def test_records_hold_the_prompt_and_progress_is_shown(models, tmp_path, capfd):
    evaluate(models[0], output_dir=str(tmp_path / "short"), **{**FAST, "progress": True, "lengths": [512]})
    progress = capfd.readouterr().err
    assert "json_kv @ 512: 100%" in progress and "2/2" in progress and "tok/s" in progress
    record = json.loads((tmp_path / "short" / "predictions" / "json_kv_512.jsonl").read_text().splitlines()[0])
    assert record["prompt_head"].startswith("JSON data:\n{") and record["prompt_tail"].endswith("Corresponding value:")
    assert len(record["prompt_sha256"]) == 16 and "prompt" not in record
    evaluate(models[0], output_dir=str(tmp_path / "full"), save_prompts=True, **{**FAST, "lengths": [512]})
    full = json.loads((tmp_path / "full" / "predictions" / "json_kv_512.jsonl").read_text().splitlines()[0])
    assert full["prompt"].startswith(record["prompt_head"]) and full["prompt"].endswith(record["prompt_tail"])
    assert full["prompt_sha256"] == record["prompt_sha256"]


@pytest.mark.parametrize("samples,depths,expected", [(3, 11, [0.0, 0.5, 1.0]), (2, 11, [0.0, 1.0]),
                                                     (5, 5, [0.0, 0.25, 0.5, 0.75, 1.0]),
                                                     (4, 3, [0.0, 0.0, 0.5, 1.0])])
def test_needle_depths_cover_the_range_for_any_sample_count(samples, depths, expected):
    assert needle_depths(samples, depths) == expected
    grid = needle_depths(100, 11)
    assert min(grid) == 0.0 and max(grid) == 1.0 and max(grid.count(d) for d in set(grid)) - min(
        grid.count(d) for d in set(grid)) <= 1


def test_callback_scores_reach_tensorboard_through_trainer_log(tokenizer, tmp_path, monkeypatch):
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import Trainer, TrainingArguments

    from evaluation.callback import RecallEvalCallback

    rows = [{"input_ids": torch.tensor(tokenizer("The grass is green. " * 4)["input_ids"])} for _ in range(2)]
    rows = [{**r, "labels": r["input_ids"]} for r in rows]
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=["tensorboard"], max_steps=1,
                             save_steps=1, per_device_train_batch_size=1, disable_tqdm=True, save_only_model=True)
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))  # transformers 5: no logging_dir argument
    trainer = Trainer(model=make_model(len(tokenizer)), args=args, train_dataset=rows, processing_class=tokenizer,
                      data_collator=lambda batch: {k: torch.stack([b[k] for b in batch]) for k in batch[0]})
    RecallEvalCallback(lengths=[256], tasks=["json_kv"], num_samples=1, generation_max_length=8,
                       progress=False).attach(trainer)
    trainer.train()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = [t for t in events.Tags()["scalars"] if "recall/json_kv_256" in t]
    assert tags, events.Tags()["scalars"]
    assert [e.step for e in events.Scalars(tags[0])] == [1]
    assert any("eval_recall/json_kv_256" in entry for entry in trainer.state.log_history)


def test_an_in_memory_model_is_known_by_its_weights(tokenizer, tmp_path):
    import torch
    model = make_model(len(tokenizer))
    kwargs = dict(tokenizer=tokenizer, output_dir=str(tmp_path), **FAST)
    evaluate(model, **kwargs)
    evaluate(model, **kwargs)  # the same weights resume
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.add_(0.01)  # one more "training step"
    with pytest.raises(EvaluationError, match="model_fingerprint"):
        evaluate(model, **kwargs)
    from evaluation.identity import model_object_fingerprint
    before = model_object_fingerprint(model)
    with torch.no_grad():  # one element that the strided sample of the tensor skips
        model.model.embed_tokens.weight[3, 5] += 0.01
    assert model_object_fingerprint(model) != before


def test_cli_tokenizer_flag_loads_that_tokenizer(models, tmp_path):
    """`evaluation.run --tokenizer PATH` (a string reaching evaluate's `tokenizer` keyword) loads it."""
    from evaluation.run import main
    main(["--model", models[0], "--tokenizer", models[1], "--tasks", "json_kv", "--lengths", "256",
          "--max_samples", "1", "--generation_max_length", "4", "--plots", "false", "--progress", "false",
          "--output_dir", str(tmp_path)])
    assert json.loads((tmp_path / "scores.json").read_text())["config"]["tokenizer"] == models[1]
    scores = evaluate(make_model(len(make_tokenizer())), tokenizer=models[1], output_dir=str(tmp_path / "in-memory"), **FAST)
    assert scores["results"][0]["status"] == "ok"  # an in-memory model with a tokenizer folder


def test_model_fingerprint_sees_a_change_anywhere_in_a_weights_file(tmp_path):
    """One tensor edited in place (same size) in a multi-MiB weights file is another model."""
    from evaluation.identity import model_dir_fingerprint
    (tmp_path / "config.json").write_text("{}")
    weights = bytearray(os.urandom(5 * 1024 * 1024))
    (tmp_path / "model.safetensors").write_bytes(bytes(weights))
    before = model_dir_fingerprint(str(tmp_path))
    weights[1536 * 1024 + 100] ^= 1  # one bit of a middle layer
    (tmp_path / "model.safetensors").write_bytes(bytes(weights))
    assert model_dir_fingerprint(str(tmp_path)) != before


def test_a_plot_that_cannot_be_written_loses_neither_scores_nor_report(models, tmp_path, caplog):
    (tmp_path / "plots").write_text("a file where the plots folder goes")
    evaluate(models[0], output_dir=str(tmp_path), **{**FAST, "plots": True})
    assert json.loads((tmp_path / "scores.json").read_text())["results"][0]["status"] == "ok"
    assert (tmp_path / "report.md").exists() and "plots not written" in caplog.text
    assert not [name for name in os.listdir(tmp_path) if ".tmp-" in name]
