"""Model-judged scores through any OpenAI-compatible chat endpoint (HELMET used GPT-4o).

Configured with `judge_base_url` (or env EVAL_JUDGE_BASE_URL), `judge_model` (or EVAL_JUDGE_MODEL)
and the API key from the env var named by `judge_api_key_env` (default OPENAI_API_KEY; `none` for a
judge that needs no key). The variable must be set, unless the URL carries the credentials itself
(`user:key@host`, `?api_key=...`) or the default variable is unset for a judge on this machine; the key and the URL's credentials are registered with
prolong.redaction, so no record, score, report or log holds them. Without a base URL the judged
scores are reported as "skipped"; ROUGE is always computed.

LongQA (NarrativeQA): HELMET scripts/eval_gpt4_longqa.py, fluency x correctness.
Summarisation (InfiniteBench Sum, Multi-LexSum): HELMET scripts/eval_gpt4_summ.py, three judge calls per
sample (fluency 0/1; key-point recall = key points found / key points; precision = supported sentences /
sentences against the expert summary), score = fluency x F1(recall, precision).
"""
import base64
import json
import logging
import os
import re
import urllib.request
from functools import lru_cache
from importlib import resources
from urllib.parse import unquote, urlsplit, urlunsplit

from prolong.redaction import redact_url, register_secret, register_url_secrets

from .metrics import parse_output

logger = logging.getLogger(__name__)

# The judge prompts are HELMET's, verbatim (scripts/eval_gpt4_longqa.py; eval_gpt4_summ.py at commit
# 2cf1ec5; inspired by https://www.databricks.com/blog/LLM-auto-eval-best-practices-RAG), kept as
# str.format templates (hence the doubled braces) in judge_prompts/<name>.txt. A task names the ones it
# uses in `Task.judge_prompts`: LongQA one (longqa), summarisation three (fluency, recall, precision;
# Multi-LexSum the *_legal set with the expert "summary/long" for precision, InfiniteBench Sum *_book).


@lru_cache(maxsize=None)
def load_prompt(name: str) -> str:
    """The judge prompt template `judge_prompts/<name>.txt`, byte for byte (read as bytes: no newline translation)."""
    path = resources.files(__package__).joinpath("judge_prompts", f"{name}.txt")
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ValueError(f"judge prompt {name!r}: no file {path}") from None


def __getattr__(name):
    # the old module constants, read from the prompt files on first use
    if name in _CONSTANTS:
        return load_prompt(_CONSTANTS[name])
    raise AttributeError(name)


_CONSTANTS = {"LONGQA_JUDGE_PROMPT": "longqa", "FLUENCY_PROMPT": "fluency_legal", "FLUENCY_PROMPT_BOOK": "fluency_book",
              "RECALL_PROMPT": "recall_legal", "RECALL_PROMPT_BOOK": "recall_book",
              "PRECISION_PROMPT": "precision_legal", "PRECISION_PROMPT_BOOK": "precision_book"}
SUMM_MAX_TOKENS = 4096  # HELMET's judge: gpt-4o-2024-05-13, temperature 0.1, generation_max_length 4096


def parse_json(text: str):
    """HELMET's parse_json: the last {...} in the reply, else the last ```json fenced block; None if neither loads."""
    matches = re.findall(r"\{.*?\}", text, re.DOTALL)
    if not matches:
        return None
    for candidate in (matches[-1], None):
        if candidate is None:
            fenced = re.findall(r"(?:```json)(.+)(?:```)", text, re.DOTALL)
            if not fenced:
                return None
            candidate = fenced[-1]
        try:
            return json.loads(candidate)
        except ValueError:
            continue
    return None


def summ_scores(fluency, recall_found, num_keypoints: int, precision_found, sentence_count) -> dict:
    """HELMET's arithmetic: recall = found / #key points, precision = supported / #sentences (0 when a
    denominator is 0), f1 = fluency * 2 r p / (r + p). judge_f1 is on 0-100 like judge_score."""
    rec = recall_found / num_keypoints if num_keypoints > 0 else 0
    prec = precision_found / sentence_count if sentence_count > 0 else 0
    f1 = fluency * 2 * (rec * prec) / (rec + prec) if rec + prec > 0 else 0
    return {"judge_fluency": fluency, "judge_recall": rec, "judge_precision": prec, "judge_f1": 100 * f1}


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
NO_KEY = "none"  # judge_api_key_env for a judge that takes no key (a local server)


def _api_key(env_name: str | None, base_url: str) -> str | None:
    """The judge's key from the variable `env_name` (None: OPENAI_API_KEY), refusing a value that is not a
    variable name (a key pasted there) and an unset variable, unless the URL carries credentials of its
    own, or the default variable is unset and the judge runs on this machine (a local server takes no key)."""
    if env_name is not None and env_name.strip().lower() == NO_KEY:
        return None
    if env_name is not None and not _ENV_NAME.fullmatch(env_name):
        register_secret(env_name)  # most likely the key itself: masked wherever it would be written
        raise ValueError("judge_api_key_env: expects the NAME of an environment variable holding the judge's API "
                         "key (e.g. OPENAI_API_KEY), and the value given is not a variable name; it looks like the "
                         "key itself, so it is not shown. Put the key in a variable (export JUDGE_KEY=...) and pass "
                         "--judge_api_key_env JUDGE_KEY, or --judge_api_key_env none for a judge that takes no key.")
    key = os.environ.get(env_name or "OPENAI_API_KEY")
    parts = urlsplit(base_url)
    local = env_name is None and parts.hostname in ("localhost", "127.0.0.1", "::1")
    if not key and not (parts.password or parts.username or parts.query or local):
        # an all-caps name is a variable's; anything else may be a key pasted there, so it is not echoed
        name = env_name or "OPENAI_API_KEY"
        name = name if re.fullmatch(r"[A-Z_][A-Z0-9_]*", name) else "named by judge_api_key_env (not shown)"
        raise ValueError(f"judge_api_key_env: the environment variable {name} is not set, so every call to the judge "
                         f"at {redact_url(base_url)} would be refused; nothing was run. Set it (export NAME=KEY), "
                         "name another variable with --judge_api_key_env, or pass --judge_api_key_env none for a "
                         "judge that takes no key (a local server).")
    register_secret(key)
    return key or None


class Judge:
    def __init__(self, base_url: str, model: str, api_key: str | None, timeout: float = 120):
        register_url_secrets(base_url)
        self.base_url, self.model, self.api_key, self.timeout = base_url.rstrip("/"), model, api_key, timeout

    @property
    def name(self) -> str:
        """Names the judge in each record, so a record judged by another judge is judged again (its URL's
        credentials and query values masked: the name is written into every record)."""
        return f"{self.model}@{redact_url(self.base_url)}"

    @classmethod
    def from_config(cls, cfg: dict):
        """The configured judge, or None; raises ValueError (before any generation) for a key that cannot work."""
        base_url = cfg.get("judge_base_url") or os.environ.get("EVAL_JUDGE_BASE_URL")
        if not base_url:
            return None
        base_url = str(base_url)
        if urlsplit(base_url).scheme not in ("http", "https"):
            raise ValueError(f"judge_base_url: {redact_url(base_url)!r} is not an http(s) URL; give the judge's "
                             "OpenAI-compatible endpoint, e.g. https://api.openai.com/v1")
        model = cfg.get("judge_model") or os.environ.get("EVAL_JUDGE_MODEL", "gpt-4o-2024-05-13")
        return cls(base_url, str(model), _api_key(cfg.get("judge_api_key_env"), base_url))

    def _request(self, body: bytes) -> urllib.request.Request:
        """POST {base_url}/chat/completions: the path goes before the URL's query (`?api-version=...`), and
        credentials in the URL (`user:key@host`) become a Basic Authorization header."""
        parts = urlsplit(self.base_url)
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        elif parts.username or parts.password:
            pair = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        url = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path.rstrip("/") + "/chat/completions",
                          parts.query, ""))
        return urllib.request.Request(url, data=body, headers=headers)

    def chat(self, prompt: str, max_tokens: int = 1024) -> str:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": 0.1, "max_tokens": max_tokens}).encode()
        request = self._request(body)
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.load(response)["choices"][0]["message"]["content"]

    def score(self, task, output: str, sample: dict) -> dict:
        """Judged metrics for one sample, or {"judge": "skipped: ..."} where no judge prompt exists."""
        if task.category == "summ":
            return self.score_summary(task, output, sample)
        if task.category != "longqa" or len(task.judge_prompts) != 1:
            return {"judge": f"skipped: no judge prompt for {task.name}"}
        prompt = load_prompt(task.judge_prompts[0]).format(
            question=sample["question"], correct_answers=sample["answer"],
            parsed_output=parse_output(output.replace("\n", " ")))
        try:
            reply = self.chat(prompt)
        except (OSError, ValueError, KeyError, IndexError, TypeError) as error:  # URLError, timeouts, bad JSON
            logger.warning("%s %s: judge call failed: %s", task.name, sample.get("id"), error)
            return {"judge": f"failed: judge call: {type(error).__name__}: {error}", "judge_failed": 1}
        found = re.findall(r"\{.*?\}", reply, re.DOTALL)
        try:
            scores = json.loads(found[-1])
            # fluency (0/1) x correctness (0-3), scaled to 0-100
            return {"judge_score": 100 * scores["fluency"] * scores["correctness"] / 3, "judge": "ok",
                    "judge_failed": 0}
        except (IndexError, ValueError, KeyError, TypeError):
            return {"judge": "failed: unparsable reply", "judge_failed": 1, "judge_details": {"output": reply}}


    def score_summary(self, task, output: str, sample: dict) -> dict:
        """HELMET eval_gpt4_summ.py for one sample. A sample whose judge call fails or whose replies do not
        parse gets {"judge": "failed: ...", "judge_failed": 1} and no judge_f1, so (as in HELMET, which
        skips it) the task's judge_f1 averages the judged samples only; judge_failed is their share."""
        keypoints = sample.get("keypoints")
        expert = sample.get("expert_summary") or (sample["answer"][0] if isinstance(sample["answer"], list)
                                                  else sample["answer"])
        if len(task.judge_prompts) != 3:
            return {"judge": f"skipped: no summarisation judge prompt for {task.name}"}
        if not keypoints:
            return {"judge": "skipped: no key points for this sample (HELMET's data: "
                             "infbench/longbook_sum_eng_keypoints.jsonl, multi_lexsum/multi_lexsum_val.jsonl)"}
        fluency_prompt, recall_prompt, precision_prompt = map(load_prompt, task.judge_prompts)
        text = output.strip()
        prompts = [fluency_prompt.format(text=text),
                   recall_prompt.format(keypoints="\n".join(f"{i + 1}. {kp}" for i, kp in enumerate(keypoints)),
                                        summary=text),
                   precision_prompt.format(expert_summary=expert, summary=text)]
        replies = []
        for prompt in prompts:
            try:
                replies.append(self.chat(prompt, max_tokens=SUMM_MAX_TOKENS))
            except (OSError, ValueError, KeyError, IndexError, TypeError) as error:  # URLError/HTTPError are OSErrors
                logger.warning("%s %s: judge call failed: %s", task.name, sample.get("id"), error)
                return {"judge": f"failed: judge call: {type(error).__name__}: {error}", "judge_failed": 1}
        details = {"fluency_output": replies[0], "recall_output": replies[1], "precision_output": replies[2]}
        f, r, p = (parse_json(reply) for reply in replies)
        try:
            scores = summ_scores(_number(f["fluency"]), _number(r["recall"]), len(keypoints),
                                 _number(p["precision"]), _number(p["sentence_count"]))
        except (TypeError, KeyError, ValueError):  # a reply without (valid) JSON, or without the expected key
            logger.warning("%s %s: unparsable judge reply", task.name, sample.get("id"))
            return {"judge": "failed: unparsable reply", "judge_failed": 1, "judge_details": details}
        details.update(recall_found=r["recall"], recall_total=len(keypoints), precision_found=p["precision"],
                       precision_total=p["sentence_count"])
        return {**scores, "judge": "ok", "judge_failed": 0, "judge_details": details}


def _number(value):
    """A judge's count as a number (bool and non-numbers rejected)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"not a number: {value!r}")
    return value
