"""Cite (ALCE): HELMET's ASQA and QAMPARI with citations, the seventh HELMET category.

Data (HELMET's release): `<data_dir>/alce/asqa_eval_gtr_top2000.json`, `qampari_eval_gtr_top2000.json`,
and the prompt files of HELMET's repository (`prompts/asqa_revised.json`, `qampari_revised.json`:
instruction, document template, 4 demonstrations), which belong in `<data_dir>/alce/` too.

Scores, as HELMET's eval_alce.py (`--citations`, at most 3 citations per sentence) and its
collect_results.py: ASQA = mean(str_em, citation_rec, citation_prec); QAMPARI =
mean(qampari_rec_top5, citation_rec, citation_prec). Citation recall: share of the output's sentences
whose cited documents (joined) entail the sentence; precision: share of citations that are needed.
Entailment comes from an NLI model the user names with `nli_model` (HELMET: TRUE-T5,
google/t5_xxl_true_nli_mixture, about 11B parameters); any seq2seq model that answers "1" for
entailment to "premise: ... hypothesis: ..." fits, or a Python object with `entails(premise, hypothesis)`.
Without one, citations are not scored and the task reports its correctness metric alone, with a note.
"""
import json
import logging
import os
import random
import re
from functools import partial

from .. import metrics as M
from .common import HELMET_DOWNLOAD, DataFileMissing, Task, helmet_shuffle, pick_by_length, read_jsonl

logger = logging.getLogger(__name__)

ALCE_DOCS = {4096: 8, 8192: 30, 16384: 75, 32768: 165, 65536: 345, 131072: 700}  # HELMET's alce_*_N
CITE_USER = "{demo_text}{instruction}\n\nQuestion: {question}\n\n{context}"
AT_MOST_CITATIONS = 3  # eval_alce.py's default --at_most_citations
HELMET_REPO = "https://github.com/princeton-nlp/HELMET"


def _how_to_get(folder: str, prompt_file: str) -> str:
    return (f"{HELMET_DOWNLOAD} (the ALCE files are in its alce/ folder); the prompt file {prompt_file} is "
            f"{HELMET_REPO}/blob/main/prompts/{prompt_file}: copy it into {folder}")


def load_alce(task, req, *, test_file: str, prompt_file: str) -> list:
    """HELMET data.py load_alce + load_data: every row's demonstrations drawn in file order from one
    RNG seeded with the run's seed (HELMET: `random.seed(seed)`, then `random.sample` per row), the
    first `num_docs` retrieved documents as the context, then a seeded shuffle and the first
    max_samples rows."""
    test_name, prompt_name = test_file, prompt_file
    answer_list = task.extra.get("answer_list", False)  # QAMPARI: the gold is a list of answers, not sub-questions
    folder = os.path.join(req.data_dir, "alce")
    prompt_path = os.path.join(folder, prompt_name)
    if not os.path.exists(prompt_path):
        raise DataFileMissing(f"Data file not found: {prompt_path}. To get it: {_how_to_get(folder, prompt_name)}.")
    with open(prompt_path, encoding="utf-8") as f:
        prompts = json.load(f)
    rows = read_jsonl(os.path.join(folder, test_name), _how_to_get(folder, prompt_name))
    num_docs = pick_by_length(req.length, ALCE_DOCS)
    instruction, demo_prompt, doc_prompt = prompts["instruction"], prompts["demo_prompt"], prompts["doc_prompt"]

    def documents(docs):
        return "\n\n".join(doc_prompt.format(**d, ID=i + 1) for i, d in enumerate(docs))

    rng = random.Random(req.seed)
    samples = []
    for index, row in enumerate(rows):
        demo_text = "\n\n\n".join(demo_prompt.format(**demo, instruction=instruction, context=documents(demo["docs"]))
                                  for demo in rng.sample(prompts["demos"], req.shots))
        if req.shots > 0:
            demo_text += "\n\n\n"
        # HELMET checks citations against the row's whole retrieved list (a citation beyond the shown
        # documents still counts as in range); `fixed` checks them against the documents shown
        cited_docs = row["docs"] if getattr(req, "mode", "helmet") == "helmet" else row["docs"][:num_docs]
        samples.append({"id": str(row.get("sample_id", row.get("id", index))), "question": row["question"],
                        "instruction": instruction, "demo_text": demo_text, "context": documents(row["docs"][:num_docs]),
                        "answer": row.get("answers") if answer_list else row.get("answer"),
                        "qa_pairs": row.get("qa_pairs"), "docs": cited_docs})
    return helmet_shuffle(samples, req.seed)[:req.max_samples]


# ---------------------------------------------------------------------------------------------
# correctness (no model needed)

def remove_citations(text: str) -> str:
    """HELMET utils.remove_citations: ' [1]', '[2]' and ' |' markers out."""
    return re.sub(r"\[\d+", "", re.sub(r" \[\d+", "", text)).replace(" |", "").replace("]", "")


def normalise_output(output: str) -> str:
    """eval_alce.py main: newlines become one space; a leaked ChatML end token is dropped."""
    return re.sub(r"\n+", " ", output).replace("<|im_end|>", "")


def _exact_presence(short_answers, context: str) -> bool:
    context = M.normalize_answer(context)
    return any(M.normalize_answer(a) in context for a in short_answers)


def qampari_scores(output: str, answers: list) -> dict:
    """compute_qampari_f1 for one row (cot off), on the output without citations; 0-1 scale."""
    preds = [M.normalize_answer(x.strip()) for x in output.rstrip().rstrip(".").rstrip(",").split(",")]
    preds = [p for p in preds if p]
    answers = [[M.normalize_answer(x) for x in group] for group in answers]
    flat = [x for group in answers for x in group]
    prec = sum(p in flat for p in preds) / len(preds) if preds else 0
    found = sum(any(x in preds for x in group) for group in answers)
    rec, rec_top5 = found / len(answers), min(5, found) / min(5, len(answers))
    f1 = lambda p, r: 2 * p * r / (p + r) if p + r else 0  # noqa: E731
    return {"num_preds": len(preds), "qampari_prec": prec, "qampari_rec": rec, "qampari_rec_top5": rec_top5,
            "qampari_f1": f1(prec, rec), "qampari_f1_top5": f1(prec, rec_top5)}


def score_alce(output: str, sample: dict) -> dict:
    """Correctness of one output: ASQA str_em/str_hit (share of the question's sub-answers present),
    QAMPARI precision/recall of the comma-separated answers."""
    text = remove_citations(normalise_output(output))
    if sample.get("qa_pairs"):
        found = [_exact_presence(pair["short_answers"], text) for pair in sample["qa_pairs"]]
        share = sum(found) / len(found)
        return {"str_em": share, "str_hit": float(share == 1)}
    return qampari_scores(text, sample["answer"])


# ---------------------------------------------------------------------------------------------
# citations (NLI model)

_WARNED_SPLITTER = []


def sentences(text: str) -> list[str]:
    """nltk.sent_tokenize as HELMET; NLTK's Punkt English model is a separate download (punkt_tab),
    without it Punkt's untrained defaults split the text (a warning says so once)."""
    import nltk
    try:
        return nltk.sent_tokenize(text)
    except LookupError:
        if not _WARNED_SPLITTER:
            _WARNED_SPLITTER.append(True)
            logger.warning("NLTK's punkt_tab model is not installed (python -m nltk.downloader punkt_tab): "
                           "Cite splits sentences with Punkt's untrained defaults, which may differ from HELMET's")
        from nltk.tokenize.punkt import PunktSentenceTokenizer
        return PunktSentenceTokenizer().tokenize(text)


def _format_document(doc: dict) -> str:
    return "Title: %s\n%s" % (doc["title"], doc["sent"] if "sent" in doc else doc["text"])


def citation_scores(output: str, sample: dict, entails, qampari: bool, at_most: int = AT_MOST_CITATIONS) -> dict:
    """eval_alce.py compute_autoais for one row: {citation_rec, citation_prec} on 0-1, or {} when the
    output has no sentence (HELMET leaves such rows out of both means)."""
    output = normalise_output(output)
    if qampari:
        sents = [sample["question"] + " " + x.strip() for x in output.rstrip().rstrip(".").rstrip(",").split(",")]
    else:  # sentences under 5 characters ("1.") are dropped, as HELMET
        sents = [s for s in sentences(output) if len(s.strip()) >= 5]
    if not sents:
        return {}
    docs = sample["docs"]
    entail = entail_prec = total_citations = 0
    for sent in sents:
        target = remove_citations(sent).strip()
        refs = [int(r[1:]) - 1 for r in re.findall(r"\[\d+", sent)]  # citations start at [1]
        if not refs or any(r >= len(docs) for r in refs):  # none, or out of range: unsupported
            supported = 0
        else:
            refs = refs[:at_most]
            total_citations += len(refs)
            supported = int(entails("\n".join(_format_document(docs[r]) for r in refs), target))
        entail += supported
        if supported and len(refs) > 1:  # precision: is every cited document needed?
            for r in refs:
                if entails(_format_document(docs[r]), target):
                    entail_prec += 1
                else:
                    rest = list(refs)
                    rest.remove(r)  # removes the first equal id, as HELMET's list.remove
                    if not entails("\n".join(_format_document(docs[p]) for p in rest), target):
                        entail_prec += 1
        else:
            entail_prec += supported
    return {"citation_rec": entail / len(sents),
            "citation_prec": entail_prec / total_citations if total_citations > 0 else 0}


class T5NLI:
    """HELMET's _run_nli_autoais: greedy generate on "premise: P hypothesis: H"; "1" means entailed."""

    def __init__(self, path: str):
        import torch
        if (os.path.isabs(path) or path.startswith(".")) and not os.path.exists(path):
            raise ValueError(f"nli_model: not found: {path}. Pass a folder or Hub id of an NLI model such as "
                             "google/t5_xxl_true_nli_mixture (HELMET's)")
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
        cuda = torch.cuda.is_available()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=torch.bfloat16 if cuda else torch.float32)
        except (OSError, ValueError) as error:
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ValueError(f"nli_model {path!r} cannot be loaded as a seq2seq model ({first_line}). Pass a folder "
                             "or Hub id of an NLI model such as google/t5_xxl_true_nli_mixture (HELMET's)") from None
        self.model = model.to("cuda" if cuda else "cpu").eval()
        self.name = path

    def entails(self, premise: str, hypothesis: str) -> int:
        import torch
        ids = self.tokenizer(f"premise: {premise} hypothesis: {hypothesis}", return_tensors="pt").input_ids
        with torch.inference_mode():
            out = self.model.generate(ids.to(self.model.device), max_new_tokens=10, do_sample=False)
        return int(self.tokenizer.decode(out[0], skip_special_tokens=True) == "1")


class CitationScorer:
    """Scores one sample's citations with `nli.entails`; `nli_model` is a path/Hub id (T5NLI) or an
    object with `entails(premise, hypothesis)` (and optionally `name`)."""

    def __init__(self, nli):
        self.nli = nli
        self.name = getattr(nli, "name", type(nli).__name__)

    @classmethod
    def from_config(cls, cfg: dict):
        spec = cfg.get("nli_model")
        if spec is None:
            return None
        return cls(T5NLI(spec) if isinstance(spec, str) else spec)

    def score(self, task, output: str, sample: dict) -> dict:
        scores = citation_scores(output, sample, self.nli.entails, qampari=task.extra.get("answer_list", False))
        return {**scores, "citation": "ok" if scores else "no sentence in the output", "citation_scored": 1,
                "nli_model": self.name}


_CITE = dict(category="cite", user_template=CITE_USER, system_template="Answer:", generation_max_length=300,
             use_chat_template=True, stop_newline=False, shots=2, primary_metric="cite_score", score=score_alce,
             separator="\n\n")

# HELMET: chat template on, no newline stop, 2 shots, 300 new tokens, 100 samples
TASKS = [
    Task(name="alce_asqa",
         load=partial(load_alce, test_file="asqa_eval_gtr_top2000.json", prompt_file="asqa_revised.json"),
         fallback_metric="str_em", score_components=("str_em", "citation_rec", "citation_prec"), **_CITE),
    Task(name="alce_qampari",
         load=partial(load_alce, test_file="qampari_eval_gtr_top2000.json", prompt_file="qampari_revised.json"),
         fallback_metric="qampari_rec_top5", score_components=("qampari_rec_top5", "citation_rec", "citation_prec"),
         extra={"answer_list": True},  # the output is a comma-separated list, each answer a claim to cite
         **_CITE),
]
