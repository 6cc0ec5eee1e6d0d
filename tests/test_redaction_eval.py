"""Evaluation writes no secret (issue 25, section 3) and refuses meaningless values before building any data.

The judge is a real OpenAI-compatible HTTP server on 127.0.0.1 that accepts only the right credentials,
wherever the user put them (the URL's query, user:key@host, an Azure-style query, a variable of any
name); `python -m evaluation.run` runs in its own process on a tiny random Llama saved to disk, and
no file it writes, nor its output, may hold the key."""
import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from helpers import make_model, make_tokenizer

from evaluation.run import main as evaluation_run
from prolong.redaction import REDACTED, redact

REPO = Path(__file__).parents[1]
SECRET = "sk-live-4f9a8e7d6c5b4a32"
BOOK = "The grass is green. " * 26300  # 131,500 tokens: HELMET's NarrativeQA keeps only books over 131,072


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tokenizer = make_tokenizer()
    make_model(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "narrativeqa").mkdir()
    rows = [{"id": f"s{i}", "context": BOOK, "question": "What colour?", "answer": ["green"]} for i in range(2)]
    (root / "narrativeqa" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root)


class _Judge(BaseHTTPRequestHandler):
    """Answers only a request carrying the key: as a Bearer token, in the query (api_key or sig), or as
    Basic credentials; anything else gets 401, as a real endpoint does."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        auth = self.headers.get("Authorization", "")
        basic = base64.b64decode(auth[6:]).decode() if auth.startswith("Basic ") else ""
        granted = (auth == f"Bearer {SECRET}" or SECRET in query.get("api_key", []) + query.get("sig", [])
                   or basic == f"judge:{SECRET}")
        self.server.seen.append((url.path, granted))
        body = json.dumps({"choices": [{"message": {"content": '{"fluency": 1, "correctness": 3}'}}]}).encode()
        self.send_response(200 if granted and url.path.endswith("/v1/chat/completions") else 401)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    server.seen = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _run_cli(args, env_extra, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "PROLONG_TRACEBACK")}
    env.update(PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", **env_extra)
    return subprocess.run([sys.executable, "-m", "evaluation.run", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


WHERE = {  # how the key reaches the judge: (judge_base_url, extra flags, environment)
    "url-query": ("http://127.0.0.1:{port}/v1?api_key=" + SECRET, [], {}),
    "url-userinfo": ("http://judge:" + SECRET + "@127.0.0.1:{port}/v1", ["--judge_api_key_env", "none"], {}),
    "azure-query": ("http://127.0.0.1:{port}/openai/v1?api-version=2024-06-01&sig=" + SECRET, [], {}),
    "variable-of-any-name": ("http://127.0.0.1:{port}/v1", ["--judge_api_key_env", "MY_JUDGE"], {"MY_JUDGE": SECRET}),
}


@pytest.mark.slow
@pytest.mark.parametrize("where", list(WHERE))
def test_the_judges_key_reaches_the_judge_and_nothing_written(where, judge, model_dir, data_dir, tmp_path):
    url, flags, env = WHERE[where]
    url = url.format(port=judge.server_address[1])
    out = tmp_path / "eval"
    run = _run_cli(["--model", model_dir, "--tasks", "narrativeqa", "--lengths", "512", "--max_samples", "2",
                    "--shots", "0", "--mode", "fixed", "--use_chat_template", "false", "--generation_max_length", "8",
                    "--data_dir", data_dir, "--output_dir", str(out), "--plots", "false", "--progress", "false",
                    "--judge_base_url", url, *flags], env, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert judge.seen and all(granted for _, granted in judge.seen), judge.seen  # the key reached the judge
    records = [json.loads(line) for line in (out / "predictions" / "narrativeqa_512.jsonl").read_text().splitlines()]
    assert [r["metrics"]["judge"] for r in records] == ["ok", "ok"]
    written = [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert written == [] and SECRET not in run.stdout + run.stderr, written
    assert records[0]["metrics"]["judge_model"].endswith(redact(url.split("@")[-1]) if "@" not in url else "/v1")
    scores = json.loads((out / "scores.json").read_text())
    assert scores["results"][0]["metric"] == "judge_score" and scores["results"][0]["score"] == 100


@pytest.mark.parametrize("value, env, url, fragment", [
    (SECRET, {}, "http://127.0.0.1:9/v1",
     "the value given is not a variable name; it looks like the key itself, so it is not shown"),
    ("MY_JUDGE", {}, "http://127.0.0.1:9/v1", "the environment variable MY_JUDGE is not set"),
    ("OPENAI_API_KEY", {}, "http://127.0.0.1:9/v1", "the environment variable OPENAI_API_KEY is not set"),
    ("MY_JUDGE", {"MY_JUDGE": ""}, "http://127.0.0.1:9/v1", "the environment variable MY_JUDGE is not set"),
    (None, {}, "https://judge.example.com/v1", "the environment variable OPENAI_API_KEY is not set"),
])
def test_judge_api_key_env_must_name_a_set_variable_before_anything_runs(value, env, url, fragment, model_dir,
                                                                          data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    for name, setting in env.items():
        monkeypatch.setenv(name, setting)
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as exit_:
        evaluation_run(["--model", model_dir, "--tasks", "narrativeqa,json_kv", "--lengths", "512", "--data_dir",
                        data_dir, "--output_dir", str(out), "--judge_base_url", url,
                        *(["--judge_api_key_env", value] if value else [])])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and fragment in err and "Traceback" not in err, err
    assert SECRET not in err and not out.exists()  # refused before any model load or generation


@pytest.mark.parametrize("flags, fragment", [
    (["--lengths", "1e9"], "lengths: '1e9' is 1,000,000,000 tokens, more than any model's window"),
    (["--lengths", "1.5"], "lengths: '1.5' is not a length; use token counts such as 8192"),
    (["--lengths", "1k,0.5"], "lengths: '0.5' is not a length"),
    (["--lengths", "8k"], "every length (8192) exceeds the model window (max_position_embeddings=2048); nothing was run"),
    (["--lengths", "64", "--generation_max_length", "64"],
     "lengths: 64 for json_kv (generation_max_length 64) leave no room for the prompt"),
    (["--lengths", "512", "--max_samples", "0"], "Config key 'max_samples' must be 1 or more, got 0"),
    (["--lengths", "512", "--max_samples", "-3"], "Config key 'max_samples' must be 1 or more, got -3"),
    (["--lengths", "512", "--num_depths", "0"], "Config key 'num_depths' must be 1 or more, got 0"),
    (["--lengths", "512", "--shots", "-1"], "Config key 'shots' must be 0 or more, got -1"),
    (["--lengths", "512", "--generation_max_length", "0"], "Config key 'generation_max_length' must be 1 or more"),
    (["--lengths", "512", "--max_samples", "many"], "Config key 'max_samples' must be a whole number, got 'many'"),
    (["--lengths", "512", "--plots", "maybe"], "Config key 'plots' must be true or false, got 'maybe'"),
    (["--lengths", "512", "--max_samples", "[1"], "--max_samples '[1': not a value"),
    (["--config", "{tmp}/twice.yaml"], "twice.yaml is not valid YAML: duplicate key 'max_samples'"),
    (["--config", "{tmp}/list.yaml"], "list.yaml must be a mapping of config keys"),
    (["--config", "{tmp}/zero.yaml"], "Config key 'max_samples' must be 1 or more, got 0 (null = the task's default) "
                                      "(in {tmp}/zero.yaml)."),
])
def test_meaningless_values_are_refused_before_any_data_is_built(flags, fragment, model_dir, tmp_path, capsys):
    (tmp_path / "twice.yaml").write_text("tasks: json_kv\nmax_samples: 2\nlengths: 512\nmax_samples: 5\n")
    (tmp_path / "list.yaml").write_text("- json_kv\n- 512\n")
    (tmp_path / "zero.yaml").write_text("lengths: 512\nmax_samples: 0\n")
    out = tmp_path / "eval"
    flags = [flag.replace("{tmp}", str(tmp_path)) for flag in flags]
    with pytest.raises(SystemExit) as exit_:
        evaluation_run(["--model", model_dir, "--tasks", "json_kv", "--output_dir", str(out), "--progress", "false",
                        *flags])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and fragment.replace("{tmp}", str(tmp_path)) in err and "Traceback" not in err, err
    assert not out.exists()


def test_redact_masks_url_credentials_queries_and_registered_secrets(monkeypatch):
    from prolong import redaction

    monkeypatch.setattr(redaction, "_REGISTERED", set())
    text = f"judge https://bob:{SECRET}@api.example.com/v1?api-version=2024&key={SECRET}#token={SECRET} and https://example.com/x"
    assert redact(text) == (f"judge https://{REDACTED}@api.example.com/v1?api-version={REDACTED}&key={REDACTED}"
                            f"#token={REDACTED} and https://example.com/x")
    assert redact({"judge_api_key_env": SECRET, "nested": [f"Bearer {SECRET}"]})["judge_api_key_env"] == REDACTED
    redaction.register_secret(SECRET)
    assert redact({"nested": [f"Bearer {SECRET}"]}) == {"nested": [f"Bearer {REDACTED}"]}
    assert redaction.mask_secrets(f"http://h/?q=1 {SECRET}") == f"http://h/?q=1 {REDACTED}"


@pytest.mark.slow
def test_a_data_cli_error_holding_a_url_with_a_key_is_redacted(model_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PROLONG_TRACEBACK"}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    run = subprocess.run([sys.executable, "-m", "prolong.data", "tokenize", f"https://bob:{SECRET}@host/d.jsonl",
                          "--tokenizer", model_dir, "--out", str(tmp_path / "out")], env=env, capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 2 and SECRET not in run.stderr + run.stdout, run.stderr
    assert f"error: input not found: https://{REDACTED}@host/d.jsonl" in run.stderr, run.stderr
