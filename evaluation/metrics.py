"""Metrics, written to give the same numbers as HELMET's utils.py (DensePhrases normalisation,
rouge-score with stemming, trec_eval's NDCG with linear gains)."""
import math
import re
import string
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

_PUNCTUATION = set(string.punctuation)


@dataclass(frozen=True)
class Metric:
    """How a per-sample metric is reported: a `fraction` (0-1, the default) is shown x100, `points`
    (already 0-100) and a `count` as they are."""
    name: str
    scale: str = "fraction"

    @property
    def report_factor(self) -> int:
        return 100 if self.scale == "fraction" else 1


# the metrics that are not 0-1 fractions; every other metric a scorer returns is one
METRICS = {m.name: m for m in [
    Metric("judge_score", "points"),  # judge.py: fluency x correctness / 3, x100
    Metric("judge_f1", "points"),     # judge.py: fluency x F1(key-point recall, precision), x100
    Metric("num_preds", "count"),     # Re-rank's ranked ids, QAMPARI's answers
]}


def metric(name: str) -> Metric:
    return METRICS.get(name) or Metric(name)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, squeeze whitespace (SQuAD/DensePhrases)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _as_list(answers):
    if isinstance(answers, str):
        return [answers]
    if answers and isinstance(answers[0], list):
        return [a for group in answers for a in group]
    return list(answers)


def exact_match(prediction: str, answers) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in _as_list(answers)))


def substring_exact_match(prediction: str, answers) -> float:
    """1 if any normalised gold answer occurs inside the normalised prediction."""
    return float(any(normalize_answer(a) in normalize_answer(prediction) for a in _as_list(answers)))


def token_f1(prediction: str, answers) -> float:
    def f1(pred, gold):
        pred, gold = normalize_answer(pred), normalize_answer(gold)
        if (pred in ("yes", "no", "noanswer") or gold in ("yes", "no", "noanswer")) and pred != gold:
            return 0.0
        common = Counter(pred.split()) & Counter(gold.split())
        same = sum(common.values())
        if same == 0:
            return 0.0
        precision, recall = same / len(pred.split()), same / len(gold.split())
        return 2 * precision * recall / (precision + recall)
    return max(f1(prediction, a) for a in _as_list(answers))


def recall_share(prediction: str, answers) -> float:
    """RULER's score: the share of gold answers found (case-insensitive substring) in the output."""
    answers = _as_list(answers)
    return sum(a.lower() in prediction.lower() for a in answers) / len(answers)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer
    return rouge_scorer.RougeScorer(["rougeL", "rougeLsum"], use_stemmer=True)


def rouge(prediction: str, answers) -> dict:
    """ROUGE-L and ROUGE-Lsum F1/recall, best over gold answers (as HELMET's calculate_metrics)."""
    scores = [_rouge_scorer().score(target=a, prediction=prediction) for a in _as_list(answers)]
    out = {}
    for kind in ("rougeL", "rougeLsum"):
        out[f"{kind}_f1"] = max(s[kind].fmeasure for s in scores)
        out[f"{kind}_recall"] = max(s[kind].recall for s in scores)
    return out


def parse_output(output: str, prefix: str = "Answer:"):
    """The text after `prefix` up to the end of that line, else the first line (HELMET parse_output)."""
    patterns = [re.compile(f"(?:{re.escape(prefix)})(.*)(?:\n|$)", flags=re.IGNORECASE),
                re.compile(r"(?:^)(.*)(?:\n|$)")]
    for pattern in patterns:
        match = pattern.search(output)
        if match is not None:
            # chat models sometimes repeat the prefix: strip it once more
            return re.sub(f"^{re.escape(prefix)}", "", match[1].strip(), flags=re.IGNORECASE).strip()
    return None


def qa_metrics(prediction: str, answers) -> dict:
    """HELMET's calculate_metrics: EM, token F1, substring EM and ROUGE-L."""
    return {"exact_match": exact_match(prediction, answers), "f1": token_f1(prediction, answers),
            "substring_exact_match": substring_exact_match(prediction, answers), **rouge(prediction, answers)}


def qa_metrics_with_parsing(prediction: str, answers, prefix: str = "Answer:") -> dict:
    """Metrics on the raw output and on the parsed answer line, keeping the better of each (HELMET)."""
    metrics = qa_metrics(prediction, answers)
    parsed = parse_output(prediction, prefix)
    if parsed is not None:
        metrics = {k: max(v, qa_metrics(parsed, answers)[k]) for k, v in metrics.items()}
    return metrics


def parse_rankings(output: str) -> dict:
    """Parse "ID3 > ID1 > ID2" into {"3": 3, "1": 2, "2": 1} (higher = more relevant).

    As HELMET: drop brackets/colons and the word "id", take the longest run of integers joined by
    '>', keep the first occurrence of each id."""
    text = re.sub(r"[\[\]:]", "", output).lower().replace("id", "")
    longest = ""
    for match in re.finditer(r"(\d+)(?:\s*>\s*(\d+))*", text):
        if len(match.group(0)) > len(longest):
            longest = match.group(0)
    ranking = [n.strip() for n in longest.split(">") if n.strip().isdigit()] if longest else [text]
    scores = {}
    for i, doc_id in enumerate(ranking):
        scores.setdefault(doc_id, len(ranking) - i)
    return scores


def ndcg_at_k(ranked_scores: dict, qrels: dict, k: int = 10) -> float:
    """trec_eval ndcg_cut.k (what HELMET gets from pytrec_eval): gain = relevance label,
    discount log2(rank + 1), ideal ranking from the judged labels."""
    ranked = sorted(ranked_scores.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[:k]
    dcg = sum(qrels.get(doc, 0) / math.log2(rank + 2) for rank, (doc, _) in enumerate(ranked))
    ideal = sorted((rel for rel in qrels.values() if rel > 0), reverse=True)[:k]
    idcg = sum(rel / math.log2(rank + 2) for rank, rel in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def multiple_choice_metrics(prediction: str, answers) -> dict:
    """InfiniteBench MC as HELMET: answers = ["B", "B. option text"]; exact match of the letter
    (raw or parsed), or the full "B. option text" appearing in the output."""
    letter_em = max(exact_match(prediction, answers),
                    exact_match(parse_output(prediction) or "", answers))
    full_option = float(answers[1].lower() in prediction.lower())
    return {"exact_match": max(letter_em, full_option), "substring_exact_match": full_option}
