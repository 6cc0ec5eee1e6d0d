"""Model-judged scores through any OpenAI-compatible chat endpoint (HELMET used GPT-4o).

Configured with `judge_base_url` (or env EVAL_JUDGE_BASE_URL), `judge_model` (or EVAL_JUDGE_MODEL)
and the API key from the env var named by `judge_api_key_env` (default OPENAI_API_KEY). Without a
base URL the judged scores are reported as "skipped"; ROUGE is always computed.
"""
import json
import os
import re
import urllib.request

from .metrics import parse_output

# HELMET scripts/eval_gpt4_longqa.py (prompt inspired by Databricks' RAG auto-eval)
LONGQA_JUDGE_PROMPT = """Please act as an impartial judge and evaluate the quality of the provided answer which attempts to answer the provided question based on a provided context.
Although you are not given the context, you will be given a set of correct answers that achieves full scores on all metrics, and you need to assess the provided answers using the correct answers.

Below is your grading rubric:

Fluency:
- Score 0 (incoherent, repetitive, or incomplete): Incoherent sentences, repetitive sentences (even if not by exact words), incomplete answers, or gibberish. Note that even if the answer is coherent, if it is repetitive or incomplete, it should be given a score of 0.
- Score 1 (coherent, non-repetitive answer): Coherent, non-repetitive, fluent, grammatically correct answers.

Correctness:
- Score 0 (Incorrect): The answer does not agree with the provided correct answers at all.
- Score 1 (partly correct): Partly agree with one of the provided correct answers (for example, the question asks for a date and a person; the answer gets the date right but the person wrong).
- Score 2 (correct but not fully relevant): Fully agrees with one of the provided correct answers but mentions other completely irrelevant information. Note that extra details provided in the answer, even if not mentioned in the correct answers, should NOT be seen as irrelevant as long as they are relevant to the question to a reasonable extend.
- Score 3 (correct and relevant): Fully agrees with one of the provided correct answers and only provides information relevant to the question. Note that if the answer is longer than the correct answer, as long as everything in the answer is relevant to the question, it should still be given score 3. For example, if the correct answer is "the North Pole" and the answer is "They are headed for the North Pole", it should still be given a score of 3.

Now, read the following question, answer, and correct answers. First think step-by-step and provide your reasoning and assessment on the answer. Then output your score in the following json format: {{"fluency": 0, "correctness": 1}}.

Question: {question}
Correct answers: {correct_answers}
Answer: {parsed_output}
"""


class Judge:
    def __init__(self, base_url: str, model: str, api_key: str | None, timeout: float = 120):
        self.base_url, self.model, self.api_key, self.timeout = base_url.rstrip("/"), model, api_key, timeout

    @classmethod
    def from_config(cls, cfg: dict):
        base_url = cfg.get("judge_base_url") or os.environ.get("EVAL_JUDGE_BASE_URL")
        if not base_url:
            return None
        model = cfg.get("judge_model") or os.environ.get("EVAL_JUDGE_MODEL", "gpt-4o-2024-05-13")
        return cls(base_url, model, os.environ.get(cfg.get("judge_api_key_env") or "OPENAI_API_KEY"))

    def chat(self, prompt: str) -> str:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": 0.1, "max_tokens": 1024}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(f"{self.base_url}/chat/completions", data=body, headers=headers)
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.load(response)["choices"][0]["message"]["content"]

    def score(self, task, output: str, sample: dict) -> dict:
        """Judged metrics for one sample, or {"judge": "skipped: ..."} where no judge prompt exists."""
        if task.category != "longqa":
            return {"judge": "skipped: the summarisation key-point judge is not implemented"}
        prompt = LONGQA_JUDGE_PROMPT.format(question=sample["question"], correct_answers=sample["answer"],
                                            parsed_output=parse_output(output.replace("\n", " ")))
        reply = self.chat(prompt)
        found = re.findall(r"\{.*?\}", reply, re.DOTALL)
        try:
            scores = json.loads(found[-1])
            # fluency (0/1) x correctness (0-3), scaled to 0-100
            return {"judge_score": 100 * scores["fluency"] * scores["correctness"] / 3, "judge": "ok"}
        except (IndexError, ValueError, KeyError, TypeError):
            return {"judge": "unparsable reply"}
