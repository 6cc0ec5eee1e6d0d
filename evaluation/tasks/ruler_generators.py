"""RULER's sample generators (NVIDIA/RULER scripts/data/synthetic/*.py), written again so that one seed and one
tokenizer give RULER's samples to the character: same random draws in the same order (RULER seeds `random` and
numpy's global generator once per script), same fitting search, same templates.

RULER runs as scripts that read argparse flags and globals; a `Generator` holds what those scripts keep in
globals (the two random streams, the tokenizer, the template). `prepare()` is RULER's search for the haystack
size, `draw()` its loop body: each returns what RULER writes to validation.jsonl, a dict with `input` (without the
answer prefix), `outputs`, `length` and `answer_prefix`, plus `context` (the haystack inside `input`, which our
prompt builder may shorten).
"""
import bisect
import copy
import gzip
import json
import math
import os
import random
import re
import string
import uuid
from functools import lru_cache

import numpy as np

from .common import DataFileMissing

RULER_DATA = ("run RULER's scripts/data/synthetic/json/download_paulgraham_essay.py and download_qa_dataset.sh "
              "(https://github.com/NVIDIA/RULER) and put PaulGrahamEssays.json, squad.json, hotpotqa.json (and, for "
              "common-words lengths past about 64K, english_words.json) in <data_dir>/ruler/")
# scripts/data/synthetic/constants.py; prepare.py appends the answer prefix to the template (RULER's `base` model
# template), and the generators split it off again at the last match of its first 10 characters
TEMPLATES = {
    "niah": ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will "
             "quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic {type_needle_v} "
             "for {query} mentioned in the provided text?",
             " The special magic {type_needle_v} for {query} mentioned in the provided text are"),
    "variable_tracking": ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
                          "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.",
                          " Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
                          "variables are assigned the value {query}, they are: "),
    "common_words_extraction": ("Below is a numbered list of words. In these words, some appear more often than others. "
                                "Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most "
                                "common words in the above list?",
                                " Answer: The top 10 words that appear most often in the list are:"),
    "freq_words_extraction": ("Read the following coded text and track the frequency of each coded word. Find the three "
                              "most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. "
                              "Please ignore the dots '....'. What are the three most frequently appeared words in the "
                              "above coded text?",
                              " Answer: According to the coded text above, the three most frequently appeared words are:"),
    "qa": ("Answer the question based on the given documents. Only give me the answer and do not output any other "
           "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
           "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}", " Answer:"),
}
TOKENS_TO_GENERATE = {"niah": 128, "variable_tracking": 30, "common_words_extraction": 120,
                      "freq_words_extraction": 50, "qa": 32}
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = [int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(int)]
MAX_RETRIES = 200  # RULER retries a sample that does not fit forever; we give up with a message


def data_file(data_dir: str, name: str) -> str:
    path = os.path.join(data_dir, "ruler", name)
    if not os.path.exists(path):
        raise DataFileMissing(f"Data file not found: {path}. To get it: {RULER_DATA}.")
    return path


@lru_cache(maxsize=None)
def sentence_splitter():
    """nltk's `sent_tokenize` (Punkt, English) from the tables shipped beside this file: nltk would download them."""
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
    with gzip.open(os.path.join(os.path.dirname(__file__), "ruler_punkt_english.json.gz"), "rt") as f:
        tables = json.load(f)
    params = PunktParameters()
    params.abbrev_types = set(tables["abbrev_types"])
    params.sent_starters = set(tables["sent_starters"])
    params.collocations = {tuple(c) for c in tables["collocations"]}
    params.ortho_context.update(tables["ortho_context"])
    return PunktSentenceTokenizer(params).tokenize


@lru_cache(maxsize=None)
def wonderwords_lists() -> tuple[list, list, list]:
    """Nouns, adjectives, verbs of wonderwords 2.x (3.x changed the noun list)."""
    from wonderwords.random_word import _get_words_from_text_file
    return tuple(_get_words_from_text_file(f"{kind}list.txt") for kind in ("noun", "adjective", "verb"))


class AdjectiveNounKeys:
    """RULER's needle keys `sorted(set(f"{adj}-{noun}"))` (6.2M strings, 9 s to build) as a lazy sequence:
    `random.choice` only needs len() and indexing. Adjectives that extend another one with "-" or " " ("high",
    "high-pitched") interleave in the sort; each such family is built in full, every other adjective is a block
    ordered by `adjective + "-"`."""

    def __init__(self, adjectives, nouns):
        adjectives, self.nouns = sorted(set(adjectives)), sorted(set(nouns))
        roots = [a for a in adjectives if not any(a.startswith(b + "-") for b in adjectives if b != a)]
        units = []
        for root in roots:
            family = [a for a in adjectives if a == root or a.startswith(root + "-")]
            items = (sorted({f"{a}-{n}" for a in family for n in self.nouns}) if len(family) > 1 else root)
            units.append((root + "-", items))
        units.sort(key=lambda unit: unit[0])
        self.units = [items for _, items in units]
        sizes = [len(items) if isinstance(items, list) else len(self.nouns) for items in self.units]
        self.starts = list(np.cumsum([0] + sizes))

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, index):
        unit = bisect.bisect_right(self.starts, index) - 1
        items, offset = self.units[unit], index - int(self.starts[unit])
        return items[offset] if isinstance(items, list) else f"{items}-{self.nouns[offset]}"


@lru_cache(maxsize=None)
def needle_keys() -> AdjectiveNounKeys:
    nouns, adjectives, _ = wonderwords_lists()
    return AdjectiveNounKeys(adjectives, nouns)


class Generator:
    """What a RULER script keeps in globals: its seed, random streams, tokenizer and template."""
    kind = ""

    def __init__(self, tokenizer, max_seq_length: int, seed: int, data_dir: str, tokens_to_generate: int | None = None):
        self.tokenizer, self.max_seq_length, self.seed, self.data_dir = tokenizer, max_seq_length, seed, data_dir
        self.random = random.Random(seed)            # random.seed(args.random_seed)
        self.np_random = np.random.RandomState(seed)  # np.random.seed(args.random_seed)
        self.tokens_to_generate = TOKENS_TO_GENERATE[self.kind] if tokens_to_generate is None else tokens_to_generate
        self.template = "".join(TEMPLATES[self.kind])

    def count(self, text: str) -> int:
        return len(self.tokenizer.tokenize(text))  # RULER's HFTokenizer.text_to_tokens: no special tokens

    def largest_fitting(self, make, budget_extra: int, lower: int, upper: int):
        """RULER's binary search for the largest haystack whose input fits; None if none does."""
        best = None
        while lower <= upper:
            mid = (lower + upper) // 2
            text, _ = make(mid)
            if self.count(text) + budget_extra <= self.max_seq_length:
                best, lower = mid, mid + 1
            else:
                upper = mid - 1
        return best

    def fit_retry(self, make, size: int, incremental: int):
        """RULER's per-sample loop: draw again (one step smaller while above `incremental`) until it fits."""
        for _ in range(MAX_RETRIES):
            try:
                text, answer = make(size)
                length = self.count(text) + self.tokens_to_generate
                assert length <= self.max_seq_length
                return text, answer, length
            except DataFileMissing:
                raise
            except Exception:  # noqa: BLE001 - RULER's bare `except:` retries on any failure (a too-long input, a sample larger than its population)
                if size > incremental:
                    size -= incremental
        raise ValueError(f"RULER {self.kind}: no sample fits {self.max_seq_length} tokens (with "
                         f"{self.tokens_to_generate} to generate); use a larger length")

    def prepare(self) -> None:
        """RULER's search for the haystack size that fits, once per run: sets `size` and `incremental`."""
        raise NotImplementedError

    def make_sample(self, size: int):
        return self.make(size)

    def draw(self) -> dict:
        """The run's next sample (RULER's loop body)."""
        text, answer, length = self.fit_retry(self.make_sample, self.size, self.incremental)
        return self.record(text, answer, length, self.last_context)

    def generate(self, num_samples: int) -> list[dict]:
        self.prepare()
        return [self.draw() for _ in range(num_samples)]

    def fork(self) -> "Generator":
        """A copy that draws the same samples from here on, this one left as it is."""
        twin = copy.copy(self)
        twin.random = random.Random()
        twin.random.setstate(self.random.getstate())
        twin.np_random = np.random.RandomState()
        twin.np_random.set_state(self.np_random.get_state())
        return twin

    def record(self, text: str, answer: list, length: int, context: str) -> dict:
        """RULER's split at the answer prefix (the last match of its first 10 characters)."""
        cut = text.rfind(TEMPLATES[self.kind][1][:10])
        return {"input": text[:cut], "outputs": answer, "length": length, "answer_prefix": text[cut:],
                "context": context}


# ---------------------------------------------------------------------------------------------
# niah.py

@lru_cache(maxsize=4)
def essay_words(path: str) -> tuple:
    with open(path, encoding="utf-8") as f:
        return tuple(re.sub(r"\s+", " ", json.load(f)["text"]).split(" "))


@lru_cache(maxsize=256)
def essay_sentences(path: str, num_words: int) -> tuple:
    """The first `num_words` words of the essays (repeated when too few), split into sentences. Cached: every
    essay task probes the same sizes, and the needles go in after the split."""
    haystack = essay_words(path)
    repeats = (num_words + len(haystack) - 1) // len(haystack)
    return tuple(sentence_splitter()(" ".join((haystack * max(repeats, 1))[:num_words]).strip()))


class NeedleInAHaystack(Generator):
    kind = "niah"
    NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."

    def __init__(self, *args, type_haystack: str, type_needle_k: str, type_needle_v: str, num_needle_k: int,
                 num_needle_v: int, num_needle_q: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.type_haystack, self.type_needle_k, self.type_needle_v = type_haystack, type_needle_k, type_needle_v
        self.num_needle_k, self.num_needle_v, self.num_needle_q = max(num_needle_k, num_needle_q), num_needle_v, num_needle_q
        if type_haystack == "essay":
            self.essays = data_file(self.data_dir, "PaulGrahamEssays.json")
        self.last_context = ""

    def random_value(self, kind: str) -> str:
        if kind == "numbers":
            return str(self.random.randint(10**6, 10**7 - 1))
        if kind == "words":
            return self.random.choice(needle_keys())
        return str(uuid.UUID(int=self.random.getrandbits(128), version=4))

    def essay_context(self, num_haystack: int, needles: list) -> str:
        sentences = essay_sentences(self.essays, num_haystack)
        depths = self.random.sample(DEPTHS, len(needles))
        positions = [0] + sorted(int(len(sentences) * (depth / 100)) for depth in depths) + [len(sentences)]
        parts = []
        for i in range(1, len(positions)):
            parts.append(" ".join(sentences[positions[i - 1]:positions[i]]))
            if i - 1 < len(needles):
                parts.append(needles[i - 1])
        return " ".join(parts)

    def make(self, num_haystack: int):
        keys, values, needles = [], [], []
        for _ in range(self.num_needle_k):
            keys.append(self.random_value(self.type_needle_k))
            value = []
            for _ in range(self.num_needle_v):
                value.append(self.random_value(self.type_needle_v))
                needles.append(self.NEEDLE.format(type_needle_v=self.type_needle_v, key=keys[-1], value=value[-1]))
            values.append(value)
        random.Random(self.seed).shuffle(needles)
        if self.type_haystack == "essay":
            context = self.essay_context(num_haystack, needles)
        else:
            if self.type_haystack == "noise":
                sentences = [NOISE] * num_haystack
            else:
                sentences = [self.NEEDLE.format(type_needle_v=self.type_needle_v, key=self.random_value(self.type_needle_k),
                                                value=self.random_value(self.type_needle_v)) for _ in range(num_haystack)]
            for index, needle in zip(sorted(self.random.sample(range(num_haystack), len(needles)), reverse=True), needles):
                sentences.insert(index, needle)
            context = "\n".join(sentences)
        indices = self.random.sample(range(self.num_needle_k), self.num_needle_q)
        queries = [keys[i] for i in indices]
        answers = [a for i in indices for a in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        template, type_needle_v = self.template, self.type_needle_v
        if self.num_needle_q * self.num_needle_v == 1:
            for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
                template = template.replace(old, new)
            type_needle_v = type_needle_v[:-1]
        self.last_context = context
        return template.format(type_needle_v=type_needle_v, context=context, query=query), answers

    def prepare(self) -> None:
        incremental = 500 if self.type_haystack == "essay" else 25
        if self.type_haystack != "essay" and self.max_seq_length < 4096:
            incremental = 5
        sample_text, _ = self.make(incremental)
        per_item = self.count(sample_text) / incremental
        upper = max(int((self.max_seq_length / per_item) * 3), incremental * 2)
        self.size = self.largest_fitting(self.make, self.tokens_to_generate, incremental, upper) or incremental
        self.incremental = incremental


# ---------------------------------------------------------------------------------------------
# variable_tracking.py (RULER's configuration: noise haystack)

class VariableTracking(Generator):
    kind = "variable_tracking"

    def __init__(self, *args, num_chains: int, num_hops: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_chains, self.num_hops = num_chains, num_hops
        self.last_context = ""

    def chains(self, is_icl: bool):
        k, num_hops = (3, min(10, self.num_hops)) if is_icl else (5, self.num_hops)
        size = (num_hops + 1) * self.num_chains
        names = ["".join(self.random.choices(string.ascii_uppercase, k=k)).upper() for _ in range(size)]
        while len(set(names)) < size:
            names.append("".join(self.random.choices(string.ascii_uppercase, k=k)).upper())
        variables, chains = [], []
        for i in range(0, len(names), num_hops + 1):
            these = names[i:i + num_hops + 1]
            variables.append(these)
            first = "12345" if is_icl else str(self.np_random.randint(10000, 99999))
            chains.append([f"VAR {these[0]} = {first}"] + [f"VAR {these[j + 1]} = VAR {these[j]} " for j in range(num_hops)])
        return variables, chains

    def make(self, num_noises: int, is_icl: bool):
        variables, chains = self.chains(is_icl)
        value = chains[0][0].split("=")[-1].strip()
        sentences = [NOISE] * num_noises
        for chain in chains:
            positions = sorted(self.random.sample(range(len(sentences)), len(chain)))
            for j, position in enumerate(positions):
                sentences.insert(position + j, chain[j])
        context = "\n".join(sentences).replace(". \n", ".\n")
        self.last_context = context
        return self.template.format(context=context, query=value, num_v=self.num_hops + 1), variables[0]

    def randomize_example(self, example: str) -> str:
        for item in example.strip().split()[-self.num_hops - 1:]:
            example = example.replace(item, "".join(self.random.choices(string.ascii_uppercase, k=len(item))).upper())
        return example.replace("12345", str(self.np_random.randint(10000, 99999)))

    def search(self, make, incremental: int, budget_extra: int) -> int:
        per_item = self.count(make(incremental)[0]) / incremental
        upper = max(int((self.max_seq_length / per_item) * 3), incremental * 2)
        return self.largest_fitting(make, budget_extra, incremental, upper) or incremental

    def example(self) -> str:
        """RULER's first call: one sample of at most 500 tokens, 3-letter names and the value 12345, generated
        with nothing left for the answer; it becomes the in-context example of every sample."""
        outer = (self.max_seq_length, self.tokens_to_generate)
        self.max_seq_length, self.tokens_to_generate = 500, 0
        try:
            make = lambda n: self.make(n, is_icl=True)  # noqa: E731
            text, answer, _ = self.fit_retry(make, self.search(make, 5, 0), 5)
        finally:
            self.max_seq_length, self.tokens_to_generate = outer
        return text + " " + " ".join(answer) + "\n"

    def prepare(self) -> None:
        self.example_text = self.example()
        self.incremental = 5 if self.max_seq_length < 4096 else 10
        self.size = self.search(lambda n: self.make(n, is_icl=False), self.incremental,
                                self.count(self.example_text) + self.tokens_to_generate)

    def make_sample(self, size: int):
        """A sample with the in-context example (its names and value drawn again) before the task."""
        text, answer = self.make(size, is_icl=False)
        cut = text.index(TEMPLATES[self.kind][0][:20])
        return text[:cut] + self.randomize_example(self.example_text) + "\n" + text[cut:], answer


# ---------------------------------------------------------------------------------------------
# common_words_extraction.py

class CommonWords(Generator):
    kind = "common_words_extraction"

    def __init__(self, *args, freq_cw: int, freq_ucw: int, num_cw: int, num_fewshot: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.freq_cw, self.freq_ucw, self.num_cw, self.num_fewshot = freq_cw, freq_ucw, num_cw, num_fewshot
        nouns, adjectives, verbs = wonderwords_lists()
        self.words = sorted(set(nouns + adjectives + verbs))
        random.Random(self.seed).shuffle(self.words)
        self.last_context = ""

    def english_words(self) -> list:
        with open(data_file(self.data_dir, "english_words.json"), encoding="utf-8") as f:
            return list(json.load(f).values())

    def example(self, num_words: int, common_repeats: int, uncommon_repeats: int, common_nums: int):
        pool = self.words if num_words <= len(self.words) else self.english_words()
        chosen = self.random.sample(pool, num_words)
        common, uncommon = chosen[:common_nums], chosen[common_nums:]
        word_list = common * int(common_repeats) + uncommon * int(uncommon_repeats)
        random.Random(self.seed).shuffle(word_list)
        return " ".join(f"{i + 1}. {word}" for i, word in enumerate(word_list)), common

    def make(self, num_words: int):
        short = self.max_seq_length < 4096
        shots = [self.example(20, 3, 1, self.num_cw) if short else self.example(40, 10, 3, self.num_cw)
                 for _ in range(self.num_fewshot)]
        context, answer = (self.example(num_words, 6, 1, self.num_cw) if short else
                           self.example(num_words, self.freq_cw, self.freq_ucw, self.num_cw))
        shots = "\n".join(self.template.format(num_cw=self.num_cw, context=c, query="") + " "
                          + " ".join(f"{i + 1}. {word}" for i, word in enumerate(a)) for c, a in shots)
        self.last_context = context
        return shots + "\n" + self.template.format(num_cw=self.num_cw, context=context, query=""), answer

    def prepare(self) -> None:
        self.incremental = 10
        per_word = self.count(self.make(4096)[0]) / 4096
        upper = max(int(self.max_seq_length // per_word) * 2, self.incremental * 2)
        self.size = self.largest_fitting(self.make, self.tokens_to_generate, self.incremental, upper) or self.incremental


# ---------------------------------------------------------------------------------------------
# freq_words_extraction.py

ZETA = {2.0: math.pi ** 2 / 6}  # scipy.special.zeta(2.0), the same double; RULER's configuration uses alpha 2


class FrequentWords(Generator):
    kind = "freq_words_extraction"

    def __init__(self, *args, alpha: float, coded_wordlen: int = 6, vocab_size: int = -1, **kwargs):
        super().__init__(*args, **kwargs)
        if float(alpha) not in ZETA:
            raise ValueError(f"RULER fwe: alpha {alpha} is not supported (RULER's configuration uses 2.0)")
        self.alpha, self.coded_wordlen, self.vocab_size = float(alpha), coded_wordlen, vocab_size

    def make(self, max_len: int, num_words: int, vocab_size: int, incremental: int):
        letters = string.ascii_lowercase
        vocab = ["".join(self.random.choices(letters, k=self.coded_wordlen)) for _ in range(vocab_size)]
        while len(set(vocab)) < vocab_size:
            vocab.append("".join(self.random.choices(letters, k=self.coded_wordlen)))
        vocab = sorted(set(vocab))
        random.Random(self.seed).shuffle(vocab)
        vocab[0] = "..."  # RULER: the top-ranked word is noise

        def text_of(n):
            counts = n * (np.arange(1, len(vocab) + 1) ** -self.alpha) / ZETA[self.alpha]
            words = [w for w, c in zip(vocab, counts.astype(int)) for _ in range(c)]
            random.Random(self.seed).shuffle(words)
            self.last_context = " ".join(words)
            return self.template.format(context=self.last_context, query=""), vocab[1:4]
        if num_words > 0:
            text, answer = text_of(num_words)
            while self.count(text) > max_len:
                num_words -= incremental
                text, answer = text_of(num_words)
        else:
            num_words = max_len // self.coded_wordlen
            text, answer = text_of(num_words)
            while self.count(text) < max_len:
                num_words += incremental
                text, answer = text_of(num_words)
            num_words -= incremental
        text, answer = text_of(num_words)
        return text, answer, num_words

    def prepare(self) -> None:
        self.budget = self.max_seq_length - self.tokens_to_generate
        self.run_vocab_size = self.budget // 50 if self.vocab_size == -1 else self.vocab_size
        _, _, self.size = self.make(self.budget, -1, self.run_vocab_size, self.budget // 32)

    def draw(self) -> dict:
        text, answer, _ = self.make(self.budget, self.size, self.run_vocab_size, self.budget // 32)
        return self.record(text, answer, self.count(text) + self.tokens_to_generate, self.last_context)


# ---------------------------------------------------------------------------------------------
# qa.py

def read_squad(path: str):
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
    doc_index = {c: i for i, c in enumerate(docs)}
    qas = []
    for d in data["data"]:
        more = [doc_index[p["context"]] for p in d["paragraphs"]]
        for p in d["paragraphs"]:
            for qa in p["qas"]:
                if not qa["is_impossible"]:
                    qas.append({"query": qa["question"], "outputs": [a["text"] for a in qa["answers"]],
                                "context": [doc_index[p["context"]]],
                                "more_context": [i for i in more if i != doc_index[p["context"]]]})
    return qas, docs


def read_hotpotqa(path: str):
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
    doc_index = {c: i for i, c in enumerate(docs)}
    qas = [{"query": d["question"], "outputs": [d["answer"]],
            "context": [doc_index[f"{t}\n{''.join(p)}"] for t, p in d["context"]]} for d in data]
    return qas, docs


class QuestionAnswering(Generator):
    kind = "qa"
    READERS = {"squad": ("squad.json", read_squad), "hotpotqa": ("hotpotqa.json", read_hotpotqa)}

    def __init__(self, *args, dataset: str, **kwargs):
        super().__init__(*args, **kwargs)
        name, reader = self.READERS[dataset]
        self.qas, self.docs = reader(data_file(self.data_dir, name))
        self.last_context = ""

    def make(self, index: int, num_docs: int):
        qa = self.qas[index]
        gold, more = qa["context"], qa.get("more_context", [])
        if num_docs < len(self.docs):
            if num_docs - len(gold) > len(more):
                taken = set(gold + more)
                others = [i for i in range(len(self.docs)) if i not in taken]
                chosen = gold + more + self.random.sample(others, max(0, num_docs - len(gold) - len(more)))
            else:
                chosen = gold + self.random.sample(more, num_docs - len(gold))
            docs = [self.docs[i] for i in chosen]
        else:
            docs = (self.docs * ((num_docs + len(self.docs) - 1) // len(self.docs)))[:num_docs]
        random.Random(self.seed).shuffle(docs)
        context = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(docs))
        self.last_context = context
        return self.template.format(context=context, query=qa["query"]), qa["outputs"]

    def prepare(self) -> None:
        self.incremental, self.drawn = 10, 0
        per_doc = self.count(self.make(0, self.incremental)[0]) / self.incremental
        upper = max(int((self.max_seq_length / per_doc) * 3), self.incremental * 2)
        self.size = (self.largest_fitting(lambda n: self.make(0, n), self.tokens_to_generate, self.incremental, upper)
                     or self.incremental)

    def draw(self) -> dict:
        """The next question of the dataset, in file order (RULER's sample index)."""
        if self.drawn >= len(self.qas):
            raise ValueError(f"RULER qa: more samples asked than the dataset's {len(self.qas)} questions")
        self.drawn += 1
        text, answer, length = self.fit_retry(lambda n: self.make(self.drawn - 1, n), self.size, self.incremental)
        return self.record(text, answer, length, self.last_context)
