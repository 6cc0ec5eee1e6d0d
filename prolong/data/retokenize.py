"""Move packed token ids to another tokenizer (`import-mds --tokenizer`): each document span of the
release is decoded with the tokenizer that made it (the source) and its text encoded with the target;
the documents are then packed again by `pack_dataset` with the domain's rules (prolong/data/pack.py).

A span's leading source BOS and trailing source special token (EOS, end of turn) mark a document's
edges: they become the target's BOS (when it adds one) and EOS. Every other token is decoded as text,
special tokens included (as their literal strings), without clean-up, so for every document the target
ids decode to the text the source ids decode to, unless the target tokenizer normalises the text (NFKC,
lowercasing, unknown characters): those documents are counted (`round_trip_mismatches`).

Each MDS shard's documents are written to a work folder beside the output (`.NAME.retokenize`) as soon as
the shard is done: a killed run, started again with the same command, re-tokenizes only the shards it
had not finished. The work folder is removed once the output is complete, and on bad input.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
from datasets.arrow_writer import ArrowWriter
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from prolong.errors import RecipeError

from .mds import default_domain, iter_shard_samples, read_index, sample_to_row
from .pack import check_document_length, pack_dataset
from .storage import atomic_output_dir
from .tokenize import PIECE_CHARS, encode_text, load_named_tokenizer, special_token_ids, tokenized_features, tokenizer_name

logger = logging.getLogger("prolong.data")

# ProLong's release was tokenized with Llama-3's tokenizer (the base model's; gated on the Hub: log in,
# or give a local copy with --source_tokenizer)
DEFAULT_SOURCE_TOKENIZER = "meta-llama/Meta-Llama-3-8B-Instruct"
CHECKED_DOCUMENTS = 8  # the first documents re-encoded with the source tokenizer: does it make these ids?
CUT_TOLERANCE = 16  # tokens at a span's edges that a cut through a word or a character may change
SHAPE_ROWS = 16  # the first rows that tell a domain's packing (mode auto)
BATCH_TOKENS = 1 << 20  # source tokens decoded and encoded per call (the fast tokenizers run a batch in parallel)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if len(differ) else n


@dataclass
class Retokenizer:
    source: PreTrainedTokenizerBase
    target: PreTrainedTokenizerBase
    eos_token: str | None = None
    round_trip_mismatches: int = 0
    _checked: list = field(default_factory=list)  # (passed, where) of the first documents

    def __post_init__(self):
        self.target_bos, self.target_eos = special_token_ids(self.target, self.eos_token)  # no EOS: refused
        self.source_bos = self.source.bos_token_id
        # every special token ends a document (Llama-3-Instruct's eos_token is <|eot_id|>; its documents
        # end with <|end_of_text|>, a special token of no attribute)
        self.source_ends = (set(self.source.all_special_ids) | {i for i, token in self.source.added_tokens_decoder.items()
                                                                 if token.special}) - {self.source_bos}
        self.source_vocab = len(self.source)

    def convert(self, spans: list[np.ndarray], where: list[str]) -> list[list[int]]:
        """Target ids of each source span (a document, or a piece of one)."""
        starts = [len(s) > 0 and int(s[0]) == self.source_bos for s in spans]
        ends = [len(s) > int(b) and int(s[-1]) in self.source_ends for s, b in zip(spans, starts)]
        bodies = [s[int(b):len(s) - int(e)].tolist() for s, b, e in zip(spans, starts, ends)]
        for body, place in zip(bodies, where):
            if body and max(body) >= self.source_vocab:
                raise ValueError(f"{place}: token id {max(body)} is beyond the vocabulary of --source_tokenizer "
                                 f"{tokenizer_name(self.source)} ({self.source_vocab} tokens): the data was not made "
                                 "with it; give the tokenizer that made it with --source_tokenizer")
        texts = self.source.batch_decode(bodies, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        self._check_source(bodies, texts, where)
        short = [i for i, text in enumerate(texts) if len(text) <= PIECE_CHARS]
        encoded = dict(zip(short, self.target([texts[i] for i in short], add_special_tokens=False,
                                              verbose=False)["input_ids"] if short else []))
        encoded.update({i: encode_text(self.target, text) for i, text in enumerate(texts) if i not in encoded})
        encoded = [encoded[i] for i in range(len(texts))]
        decoded = self.target.batch_decode(encoded, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        for text, again, place in zip(texts, decoded, where):
            if text != again:
                if not self.round_trip_mismatches:
                    logger.warning("%s: the target tokenizer does not give back the text (it normalises it): %r "
                                   "became %r; such documents are counted in round_trip_mismatches",
                                   place, text[:80], again[:80])
                self.round_trip_mismatches += 1
        bos = [self.target_bos] if self.target_bos is not None else []
        return [(bos if b else []) + ids + ([self.target_eos] if e else []) for ids, b, e in zip(encoded, starts, ends)]

    def _check_source(self, bodies: list[list[int]], texts: list[str], where: list[str]) -> None:
        """Re-encode the first documents with the source tokenizer: the release's ids must come back (but
        at a cut through a word or a character at either edge), else it is not the tokenizer that made
        them, and the decoded text is garbage."""
        if len(self._checked) >= CHECKED_DOCUMENTS:
            return
        for body, text, place in zip(bodies, texts, where):
            if len(self._checked) >= CHECKED_DOCUMENTS:
                break
            if len(body) >= 2:
                again = encode_text(self.source, text)
                same = _common_prefix(again, body) + _common_prefix(again[::-1], body[::-1])
                self._checked.append((same >= len(body) - 2 * min(CUT_TOLERANCE, len(body) // 4), place))
        failed = [place for passed, place in self._checked if not passed]
        if len(failed) * 2 > len(self._checked):
            raise ValueError(f"--source_tokenizer {tokenizer_name(self.source)} does not round-trip the data's ids: "
                             f"re-encoding the text it decodes gives other ids in {len(failed)} of the first "
                             f"{len(self._checked)} documents (e.g. {failed[0]}), so it is not the tokenizer that "
                             "made them. Give that tokenizer with --source_tokenizer (ProLong's release: "
                             f"{DEFAULT_SOURCE_TOKENIZER})")


def load_retokenizer(tokenizer, source_tokenizer, eos_token: str | None) -> Retokenizer:
    """Both tokenizers (names or loaded ones); a target without EOS is refused here, before any work."""
    source = source_tokenizer or DEFAULT_SOURCE_TOKENIZER
    if isinstance(source, str):
        try:
            source = load_named_tokenizer(source, field="--source_tokenizer")
        except RecipeError:  # already names the flag
            raise
        except (OSError, ValueError) as error:  # a Hub id that cannot be had (gated: log in, or give a local copy)
            raise type(error)(f"--source_tokenizer {source}: {error}") from error
    target = load_named_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    return Retokenizer(source, target, eos_token)


def _row_shape(rows, mode: str, document_length: int | None, source: Path) -> tuple[str, int, int | None]:
    """(mode, row length L, document length D) of the release's domain, from its first rows. Mode `auto`:
    long when every row holds spans of one length (one document piece, or D-token documents), else short
    (documents concatenated). D is given, or, in long mode, the span length of a row of several equal
    spans (ProLong's `book-65536` at 512K)."""
    first = [row for _, row in itertools.islice(rows, SHAPE_ROWS)]
    if not first:
        raise ValueError(f"{source}: its MDS index lists no samples; nothing to import")
    if "mask" in first[0]:
        raise ValueError(f"{source} has loss masks (SFT data), which text cannot carry: import it without --tokenizer, "
                         "or tokenize the conversations again with `prolong-data tokenize`")
    length = len(first[0]["input_ids"])
    spans = [np.diff(row["indices"], axis=1).ravel() for row in first]
    if mode == "auto":
        mode = "long" if all(np.all(s == s[0]) for s in spans) else "short"
        logger.info("%s: its rows hold %s: re-packed --mode %s", source.name, "one document length each"
                    if mode == "long" else "concatenated documents", mode)
    if mode == "long" and document_length is None and len(spans[0]) > 1 and np.all(spans[0] == spans[0][0]):
        document_length = int(spans[0][0])
        logger.info("%s: rows of %d-token documents: re-packed as such (--document_length %d)", source.name,
                    document_length, document_length)
    if document_length and length % document_length:
        raise ValueError(f"{source.name}: its rows have {length} tokens, not a multiple of --document_length "
                         f"{document_length}: a row holds whole documents; give a --document_length that divides "
                         f"{length}")
    check_document_length(mode, length, document_length)
    return mode, length, document_length


def _work_dir(out: Path, mds_dir, retokenizer: Retokenizer, mode: str, document_length: int | None) -> Path:
    """The folder of finished shards; kept only if made by the same command (input, tokenizers, packing)."""
    work = out.parent / f".{out.name}.retokenize"
    key = {"input": str(Path(mds_dir).absolute()), "source_tokenizer": tokenizer_name(retokenizer.source),
           "tokenizer": tokenizer_name(retokenizer.target), "target_vocabulary": len(retokenizer.target),
           "eos_token": retokenizer.eos_token, "mode": mode, "document_length": document_length}
    state = work / "work.json"
    if state.is_file():
        if json.loads(state.read_text(encoding="utf-8")) == key:
            logger.info("%s holds a stopped run's re-tokenized shards: they are kept", work)
            return work
        logger.warning("%s was made from other input or tokenizers: starting over", work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    state.write_text(json.dumps(key, indent=2) + "\n", encoding="utf-8")
    return work


def _retokenize_shard(samples, retokenizer: Retokenizer, domain: str, path: Path, min_tokens: int | None,
                      progress) -> dict:
    """Re-tokenize one shard's documents into `path` (an Arrow file of tokenized documents), written under
    another name and renamed when complete, with its counts beside it."""
    mismatches = retokenizer.round_trip_mismatches
    partial = path.with_suffix(".partial")
    writer = ArrowWriter(features=tokenized_features(False), path=str(partial))
    spans, places, domains, tokens, documents = [], [], [], 0, 0

    def flush():
        ids = retokenizer.convert(spans, places)
        if min_tokens is not None:
            short = next((i for i, doc in enumerate(ids) if len(doc) < min_tokens), None)
            if short is not None:
                raise ValueError(f"{places[short]}: re-tokenized with {tokenizer_name(retokenizer.target)}, this "
                                 f"document has {len(ids[short])} tokens, fewer than --document_length {min_tokens} "
                                 f"(the release's has {len(spans[short])}): give a --document_length that divides "
                                 f"the row length and is at most {len(ids[short])}, so that every row holds whole "
                                 "documents")
        writer.write_table(pa.table({"input_ids": pa.array(ids, pa.list_(pa.int32())),
                                     "domain": pa.array(domains, pa.string()),
                                     "length": pa.array([len(doc) for doc in ids], pa.int64())}))

    for where, row in samples:
        for number, (start, end) in enumerate(row["indices"].tolist()):
            spans.append(row["input_ids"][start:end])
            places.append(f"{where} document {number}")
            domains.append(row["domain"] or domain)
        tokens += len(row["input_ids"])
        progress.update(1)
        if tokens >= BATCH_TOKENS:
            flush()
            documents += len(spans)
            spans, places, domains, tokens = [], [], [], 0
    if spans:
        flush()
        documents += len(spans)
    writer.finalize()
    writer.close()
    counts = {"documents": documents, "round_trip_mismatches": retokenizer.round_trip_mismatches - mismatches}
    path.with_suffix(".json").write_text(json.dumps(counts) + "\n", encoding="utf-8")
    os.replace(partial, path)  # last: the shard counts as done only once its documents are complete
    return counts


def _retokenize_domain(index_files: list[Path], work: Path, out: Path, *, domain: str, source: Path, mode: str,
                       retokenizer: Retokenizer, document_length: int | None, overwrite: bool) -> dict:
    shards = [(index_path, shard) for index_path in index_files for shard in read_index(index_path)]

    def rows(index_path, shard):
        return ((where, sample_to_row(record, domain, where)) for where, record in iter_shard_samples(index_path, shard))

    mode, length, document_length = _row_shape(rows(*shards[0]) if shards else iter(()), mode, document_length,
                                               source)
    work.mkdir(exist_ok=True)
    files, counts = [], {"documents": 0, "round_trip_mismatches": 0}
    finished = sum((work / f"shard-{number:05d}.arrow").is_file() for number in range(len(shards)))
    if finished:
        logger.info("%s: %d of %d shards already re-tokenized (by a stopped run): resuming", domain, finished,
                    len(shards))
    with tqdm(total=sum(shard.get("samples", 0) for _, shard in shards), unit="seq",
              desc=f"re-tokenize {domain}") as progress:
        for number, (index_path, shard) in enumerate(shards):
            path = work / f"shard-{number:05d}.arrow"
            if path.is_file():  # finished by an earlier, stopped run
                done = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
                progress.update(shard.get("samples", 0))
            else:
                done = _retokenize_shard(rows(index_path, shard), retokenizer, domain, path,
                                         document_length if mode == "long" else None, progress)
            counts = {key: counts[key] + done[key] for key in counts}
            files.append(path)
    tokenized = datasets.concatenate_datasets([datasets.Dataset.from_file(str(path)) for path in files])
    if counts["round_trip_mismatches"]:
        logger.warning("%s: %d of %d documents do not decode to the release's text once re-tokenized (the target "
                       "tokenizer normalises it)", domain, counts["round_trip_mismatches"], counts["documents"])
    extra = {"source": f"mds:{source.absolute()}", "source_tokenizer": tokenizer_name(retokenizer.source),
             "round_trip_mismatches": counts["round_trip_mismatches"]}
    return pack_dataset(tokenized, out, mode=mode, length=length, document_length=document_length,
                        tokenizer_name=tokenizer_name(retokenizer.target), overwrite=overwrite, extra_metadata=extra)


def import_retokenized(mds_dir, out_dir, plan: dict, *, mode: str, domain: str | None, retokenizer: Retokenizer,
                       document_length: int | None, overwrite: bool) -> dict:
    """`import_mds` with a target tokenizer: re-tokenize and re-pack each domain of `plan` (see
    `mds.plan_domains`): one packed dataset at `out_dir`, or one per domain under it."""
    out = Path(out_dir).absolute()
    work = _work_dir(out, mds_dir, retokenizer, mode, document_length)
    options = {"mode": mode, "retokenizer": retokenizer, "document_length": document_length}
    try:
        if None in plan:
            result = _retokenize_domain(plan[None], work / "domain", out, domain=domain or default_domain(Path(mds_dir)),
                                        source=Path(mds_dir), overwrite=overwrite, **options)
        else:
            with atomic_output_dir(out, overwrite=overwrite, fmt="prolong-packed", inputs=[mds_dir]) as tmp:
                result = {name: _retokenize_domain(files, work / name, tmp / name, domain=name,
                                                   source=Path(mds_dir) / name, overwrite=False, **options)
                          for name, files in plan.items()}
    except ValueError:  # bad input: a second run would fail alike, so nothing is kept
        shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    return result
