"""The summarisation judge (HELMET scripts/eval_gpt4_summ.py) against a real OpenAI-compatible HTTP server.

The server runs on 127.0.0.1 in a thread and answers /chat/completions with replies the test scripts
(one per HELMET call: fluency, recall, precision); it records every request body and header.
"""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from evaluation import report
from evaluation.judge import (FLUENCY_PROMPT, FLUENCY_PROMPT_BOOK, PRECISION_PROMPT, RECALL_PROMPT_BOOK, Judge,
                              parse_json)
from evaluation.tasks import TASKS, get_task


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        prompt = body["messages"][-1]["content"]
        kind = ("fluency" if "evaluate the fluency" in prompt else
                "recall" if "Recall:\n" in prompt else "precision" if "Precision:\n" in prompt else "other")
        reply = server.replies[kind]
        if reply is None:  # scripted server error
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"internal error")
            return
        payload = json.dumps({"id": "cmpl-test", "object": "chat.completion", "model": body["model"],
                              "choices": [{"index": 0, "finish_reason": "stop",
                                           "message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):  # keep pytest output quiet
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.requests, httpd.replies = [], {}
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def judge(server, monkeypatch):
    monkeypatch.setenv("EVAL_JUDGE_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}/v1")
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test-123")
    judge = Judge.from_config({"judge_model": "judge-model-x", "judge_api_key_env": "TEST_JUDGE_KEY"})
    judge.timeout = 5
    return judge


LEXSUM_SAMPLE = {"id": "case-1", "answer": "The short gold summary.", "expert_summary": "The long EXPERT summary text.",
                 "keypoints": ["Plaintiffs sued the city.", "The court granted an injunction.",
                               "The parties settled.", "Monitoring ended in 2020."]}
OUTPUT = "  The plaintiffs sued the city. The court granted an injunction.  \n"


def test_multi_lexsum_scores_and_request(server, judge):
    server.replies = {
        "fluency": 'The text is coherent.\n{"fluency": 1}',
        "recall": 'Key points 1, 2 and 3 are present... Output: {"recall": 3}',
        "precision": 'Reasoning: {some braces} ... Output: {"precision": 2, "sentence_count": 5}',
    }
    metrics = judge.score(get_task("multi_lexsum"), OUTPUT, LEXSUM_SAMPLE)
    # recall 3/4 = 0.75, precision 2/5 = 0.4, f1 = 1 * 2*0.75*0.4/(0.75+0.4) = 0.6/1.15
    assert metrics["judge"] == "ok" and metrics["judge_failed"] == 0
    assert metrics["judge_fluency"] == 1
    assert metrics["judge_recall"] == pytest.approx(0.75)
    assert metrics["judge_precision"] == pytest.approx(0.4)
    assert metrics["judge_f1"] == pytest.approx(100 * 0.6 / 1.15)  # 52.17...
    assert metrics["judge_details"]["recall_found"] == 3 and metrics["judge_details"]["precision_total"] == 5

    # three calls, in HELMET's order, to <base>/chat/completions with the model, key and HELMET's prompts
    assert [r["path"] for r in server.requests] == ["/v1/chat/completions"] * 3
    bodies = [r["body"] for r in server.requests]
    assert all(b["model"] == "judge-model-x" and b["temperature"] == 0.1 and b["max_tokens"] == 4096 for b in bodies)
    assert all(r["auth"] == "Bearer sk-test-123" for r in server.requests)
    fluency, recall, precision = (b["messages"][0]["content"] for b in bodies)
    summary = OUTPUT.strip()
    assert fluency == FLUENCY_PROMPT.format(text=summary)
    assert f'Summary: "{summary}"' in recall
    keypoint_block = ("Key points:\n1. Plaintiffs sued the city.\n2. The court granted an injunction.\n"
                      "3. The parties settled.\n4. Monitoring ended in 2020.\n")
    assert keypoint_block in recall and "evaluate the quality of the provided summary of a civil lawsuit" in recall
    assert precision == PRECISION_PROMPT.format(expert_summary="The long EXPERT summary text.", summary=summary)


def test_infbench_book_prompts_fenced_json_and_zero_fluency(server, judge):
    sample = {"id": "7", "answer": ["Gold book summary."], "keypoints": ["A", "B", "C"]}
    server.replies = {
        "fluency": '{"fluency": 0}',
        # the last {...} is not JSON, so HELMET's parser falls back to the ```json block
        "recall": 'Thinking {supported: 1, 2}\n```json\n{"supported_key_points": [1, 2], "recall": 2}\n```',
        "precision": '{"precision": 3, "sentence_count": 3}',
    }
    metrics = judge.score(get_task("infbench_sum_eng"), "A summary.", sample)
    assert metrics["judge"] == "ok"
    assert metrics["judge_recall"] == pytest.approx(2 / 3) and metrics["judge_precision"] == 1.0
    assert metrics["judge_f1"] == 0  # fluency 0 zeroes the score
    fluency, recall, precision = (r["body"]["messages"][0]["content"] for r in server.requests)
    assert fluency == FLUENCY_PROMPT_BOOK.format(text="A summary.")
    assert recall == RECALL_PROMPT_BOOK.format(keypoints="1. A\n2. B\n3. C", summary="A summary.")
    assert "<start of summary>Gold book summary.<end of summary>" in precision  # answer[0] is the expert summary

    # zero sentences / recall and precision both 0: HELMET's guards give 0, not a division error
    server.requests.clear()
    server.replies = {"fluency": '{"fluency": 1}', "recall": '{"recall": 0}',
                      "precision": '{"precision": 0, "sentence_count": 0}'}
    metrics = judge.score(get_task("infbench_sum_eng"), "A summary.", sample)
    assert (metrics["judge_recall"], metrics["judge_precision"], metrics["judge_f1"]) == (0, 0, 0)


def test_malformed_or_failed_judgment_is_counted_not_raised(server, judge):
    task = get_task("multi_lexsum")
    good = {"fluency": '{"fluency": 1}', "recall": '{"recall": 4}', "precision": '{"precision": 1, "sentence_count": 1}'}
    for broken in ({"recall": "I cannot grade this summary."},             # no JSON at all
                   {"precision": '{"precision": 2}'},                     # JSON without sentence_count
                   {"fluency": '{"fluency": "high"}'},                    # not a number
                   {"recall": None}):                                     # HTTP 500 from the endpoint
        server.replies = {**good, **broken}
        metrics = judge.score(task, OUTPUT, LEXSUM_SAMPLE)
        assert metrics["judge"].startswith("failed") and metrics["judge_failed"] == 1
        assert "judge_f1" not in metrics

    # the task score averages the judged samples only (HELMET skips failed ones); judge_failed is their share
    server.replies = good
    ok = judge.score(task, OUTPUT, LEXSUM_SAMPLE)
    assert ok["judge_f1"] == pytest.approx(100.0)
    server.replies = {**good, "fluency": "no json"}
    failed = judge.score(task, OUTPUT, LEXSUM_SAMPLE)
    summary = report.summarise(task, [{"metrics": ok, "input_tokens": 1}, {"metrics": failed, "input_tokens": 1}])
    assert summary["metric"] == "judge_f1" and summary["score"] == pytest.approx(100.0)
    assert summary["metrics"]["judge_failed"] == pytest.approx(50.0)


def test_no_key_points_or_no_endpoint_is_skipped(server, judge, monkeypatch):
    metrics = judge.score(get_task("multi_lexsum"), OUTPUT, {**LEXSUM_SAMPLE, "keypoints": None})
    assert metrics["judge"].startswith("skipped") and server.requests == []
    monkeypatch.delenv("EVAL_JUDGE_BASE_URL")
    assert Judge.from_config({"judge_base_url": None}) is None  # runner then records "skipped: no judge configured"
    # without a judge the task falls back to ROUGE-Lsum
    task = get_task("infbench_sum_eng")
    record = {"metrics": {**task.score("Summary: a b c", {"answer": ["a b c"]}), "judge": "skipped: no judge configured"},
              "input_tokens": 1}
    summary = report.summarise(task, [record])
    assert summary["metric"] == "rougeLsum_f1" and summary["score"] == pytest.approx(100.0)


def test_parse_json_follows_helmet():
    assert parse_json('x {"a": 1} y {"b": 2}') == {"b": 2}
    assert parse_json("no braces") is None
    assert parse_json("{not json}") is None  # no fenced block to fall back to


def test_loaders_attach_helmet_key_points_and_expert_summary(tmp_path):
    from evaluation.tasks import LoadRequest

    def write(path, rows):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    from conftest import train_tiny_tokenizer
    book = " the" * 66_000  # HELMET keeps Multi-LexSum / InfiniteBench documents of at least 65,536 tokens
    write(tmp_path / "multi_lexsum" / "validation.jsonl",
          [{"id": "c1", "sources": [book], "summary/short": "short 1", "summary/long": "long 1"},
           {"id": "c2", "sources": [book], "summary/short": "short 2", "summary/long": "long 2"}])
    write(tmp_path / "multi_lexsum" / "multi_lexsum_val.jsonl", [{"id": "c1", "summary/short_keypoints": ["k1", "k2"]}])
    write(tmp_path / "infbench" / "longbook_sum_eng.jsonl",
          [{"id": 0, "context": book, "input": "", "answer": ["gold"]}])
    write(tmp_path / "infbench" / "longbook_sum_eng_keypoints.jsonl", [{"id": 0, "keypoints": ["p1"]}])
    request = LoadRequest(length=1024, input_budget=600, max_samples=5, seed=42, shots=0, data_dir=str(tmp_path),
                          length_tokenizer=train_tiny_tokenizer())
    lexsum = {s["id"]: s for s in get_task("multi_lexsum").load(get_task("multi_lexsum"), request)}
    assert lexsum["c1"]["keypoints"] == ["k1", "k2"] and lexsum["c1"]["expert_summary"] == "long 1"
    assert lexsum["c2"]["keypoints"] is None  # no key points: the judge skips this sample
    book = get_task("infbench_sum_eng").load(get_task("infbench_sum_eng"), request)
    assert book[0]["keypoints"] == ["p1"] and book[0]["answer"] == ["gold"]


def test_judge_prompt_files_are_helmets_text_byte_for_byte():
    """The prompts live in evaluation/judge_prompts/*.txt; the pinned digests are those of the Python
    strings they replaced (HELMET's prompts, verbatim), so an edit or a newline change shows here."""
    import hashlib

    from evaluation.judge import load_prompt
    pins = json.loads((Path(__file__).parent / "fixtures" / "judge_prompts_sha256.json").read_text())
    assert {name: hashlib.sha256(load_prompt(name).encode("utf-8")).hexdigest() for name in pins} == pins
    assert {t.name: t.judge_prompts for t in TASKS.values() if t.judge_prompts} == {
        "narrativeqa": ("longqa",), "infbench_sum_eng": ("fluency_book", "recall_book", "precision_book"),
        "multi_lexsum": ("fluency_legal", "recall_legal", "precision_legal")}
