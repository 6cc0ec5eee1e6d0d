"""SFT data: chat, prompt/completion or packed datasets -> pre-tokenized rows for TRL's SFTTrainer.

Loss masks are computed here for ANY chat template, with or without `{% generation %}` markers:
``prolong.data.tokenize.tokenize_conversation`` (the same code `prolong-data tokenize` uses) renders
the conversation prefix by prefix and marks the tokens whose first character lies inside an
assistant turn. We then unmark the template's whitespace after the end-of-turn token (ChatML's
"\\n" after <|im_end|>): generation stops at the end token, so that text is never produced. The
masked text of every assistant turn is therefore exactly its content + the end-of-turn token.

Output columns, by kind of input:

* ``messages`` (UltraChat's layout)  -> ``input_ids``, ``assistant_masks``
* string ``prompt`` + ``completion``  -> ``input_ids``, ``completion_mask`` (conversational
  prompt/completion rows are joined into ``messages``: the loss is on the assistant turns)
* ``prolong-data pack --mode sft``    -> ``input_ids``, ``labels``, ``seq_lengths``: rows stay as
  packed; TRL's padding-free collator turns ``seq_lengths`` into position restarts.

TRL folds the masks into ``labels`` and, with ``packing_strategy: bfd``, bin-packs whole
conversations into padding-free rows. Conversations longer than ``max_length`` are DROPPED and
counted (a truncated reply would teach the model to stop mid-answer; ProLong also drops them), as
are conversations without an assistant token.

Turns may hold OpenAI-style content parts (``[{"type": "text", "text": ...}]``), joined as
``prolong-data tokenize`` joins them. Every map writes its Arrow cache to scratch space removed at
exit, never into the user's dataset folder (which may be read-only, or shared).

The tiny recipe's chat data: ``python -m prolong.demo chatterbot --out demo_data/chatterbot``.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from prolong.training.collator import IGNORE_INDEX
from prolong.errors import RecipeError
from prolong.data.storage import read_metadata
from prolong.data.tokenize import tokenize_conversation
from prolong.io.files import DATA_FILE_ENDINGS, chat_turns, data_file_builder, read_data_file, root_cause
from prolong.io.hub import require_path_or_hub_id

logger = logging.getLogger(__name__)


class SFTDataError(ValueError):
    """The SFT dataset or tokenizer cannot be used; the message says what to change."""


@dataclass
class SFTDataStats:
    kind: str  # messages | prompt_completion | packed
    examples: int  # conversations (or packed rows) read
    kept: int
    dropped_too_long: int
    dropped_no_target: int
    tokens: int
    target_tokens: int


# ---------------------------------------------------------------------------------------------
# Loading


def load_sft_dataset(name: str | None, config: str | None = None, split: str = "train") -> datasets.Dataset:
    """A Hub id, a data file (.jsonl/.json/.parquet/.csv, json and csv also .gz/.zst), a folder of data
    files, or a saved dataset."""
    if not name:
        raise RecipeError("dataset_name is missing: e.g. HuggingFaceH4/ultrachat_200k (dataset_split: train_sft).")
    path = Path(name)
    if path.is_file():
        if data_file_builder(path) is None:
            raise RecipeError(f"dataset_name: cannot read '{name}'; use one of {list(DATA_FILE_ENDINGS)}.")
        return _read(name, lambda: read_data_file(path))
    if path.is_dir():
        metadata = read_metadata(path) or {}
        if metadata.get("format") == "prolong-packed" and metadata.get("mode") != "sft":
            raise SFTDataError(
                f"{name} was packed with --mode {metadata.get('mode')}, which cuts and mixes documents; "
                "SFT needs conversations packed whole: `prolong-data pack --mode sft`."
            )
        if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            dataset = _read(name, lambda: datasets.load_from_disk(str(path)))
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise RecipeError(f"dataset_split: '{split}' is not in {name} (splits: {list(dataset)}).")
                dataset = dataset[split]
            return dataset
        return _read(name, lambda: datasets.load_dataset(str(path), config, split=split))
    require_path_or_hub_id(  # a missing local path fails at once, not after a minute of Hub retries
        name, "dataset_name", repo_type="dataset",
        hint="The tiny recipe's chat data is built with `python -m prolong.demo chatterbot --out demo_data/chatterbot`.",
    )
    return datasets.load_dataset(name, config, split=split)


def _read(name: str, load):
    """`load()`, its failure (a bad JSON line, files whose fields disagree, a damaged Arrow file) naming
    the dataset and the reader's own message (datasets wraps it in a message naming nothing)."""
    try:
        return load()
    except Exception as error:  # datasets' DatasetGenerationError is no ValueError
        cause = root_cause(error)
        raise SFTDataError(f"dataset_name: cannot read {name}: {type(cause).__name__}: {cause}. Fix the file "
                           "(every line one JSON object, the same fields and types in every row and file).") from error


def _scratch_cache(stem: str) -> str:
    """An Arrow cache file in datasets' temporary folder (removed when the process exits): a map over a
    saved dataset would otherwise write cache-*.arrow into the user's folder."""
    from datasets.fingerprint import get_temporary_cache_files_directory

    return os.path.join(get_temporary_cache_files_directory(), f"{stem}-{uuid.uuid4().hex}.arrow")


def dataset_kind(columns: list[str]) -> str:
    if "input_ids" in columns and "indices" in columns:
        return "packed"
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion"
    raise SFTDataError(
        f"The SFT dataset has columns {columns}. It needs `messages` (a list of {{role, content}} turns, "
        "UltraChat's layout), or `prompt` + `completion`, or to be a `prolong-data pack --mode sft` "
        "directory (input_ids/indices/mask). Rename the column (e.g. dataset.rename_column('conversation', "
        "'messages')) or convert the rows."
    )


# ---------------------------------------------------------------------------------------------
# Assistant-token masks


def _check_messages(messages, row: int) -> list[dict]:
    """The conversation with string contents (content parts joined), or SFTDataError naming the row."""
    if not isinstance(messages, list) or not messages:
        raise SFTDataError(f"row {row}: `messages` must be a non-empty list of {{role, content}} turns, got {messages!r:.80}.")
    try:
        return chat_turns(messages, first_turn=0)  # rows and turns count from 0 here
    except ValueError as error:
        raise SFTDataError(f"row {row}, {error}.") from None


def conversation_tokens(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, mask) of one conversation: mask is 1 on assistant content + end-of-turn tokens."""
    return tokenize_conversation(tokenizer, messages, tokenizer.eos_token_id)


def _tokenize_messages(batch, rows, tokenizer):
    out = {"input_ids": [], "assistant_masks": []}
    for row, messages in zip(rows, batch["messages"]):
        input_ids, mask = conversation_tokens(tokenizer, _check_messages(messages, row))
        out["input_ids"].append(input_ids)
        out["assistant_masks"].append(mask)
    out["length"] = [len(ids) for ids in out["input_ids"]]
    out["num_targets"] = [sum(mask) for mask in out["assistant_masks"]]
    return out


def _tokenize_prompt_completion(batch, rows, tokenizer):
    out = {"input_ids": [], "completion_mask": []}
    for row, prompt, completion in zip(rows, batch["prompt"], batch["completion"]):
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise SFTDataError(f"row {row}: `prompt` and `completion` must both be strings or both be message lists.")
        prompt_ids = tokenizer(prompt)["input_ids"]  # with the tokenizer's BOS, like plain text
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out["input_ids"].append(prompt_ids + completion_ids)
        out["completion_mask"].append([0] * len(prompt_ids) + [1] * len(completion_ids))
    out["length"] = [len(ids) for ids in out["input_ids"]]
    out["num_targets"] = [sum(mask) for mask in out["completion_mask"]]
    return out


def _packed_rows(batch):
    """prolong-data sft rows -> labels (-100 where mask is 0) and the document lengths of each row."""
    out = {"labels": [], "seq_lengths": []}
    masks = batch.get("mask") or [None] * len(batch["input_ids"])
    for input_ids, spans, mask in zip(batch["input_ids"], batch["indices"], masks):
        labels = np.asarray(input_ids, dtype=np.int64)
        if mask is not None:
            labels[np.asarray(mask) == 0] = IGNORE_INDEX
        out["labels"].append(labels.tolist())
        out["seq_lengths"].append([int(end) - int(start) for start, end in spans])
    out["length"] = [len(ids) for ids in batch["input_ids"]]
    out["num_targets"] = [int((np.asarray(labels) != IGNORE_INDEX).sum()) for labels in out["labels"]]
    return out


def prepare_sft_dataset(
    dataset: datasets.Dataset, tokenizer, max_length: int, num_proc: int | None = None
) -> tuple[datasets.Dataset, SFTDataStats]:
    """Tokenize, mask and filter ``dataset`` into the pre-tokenized rows SFTTrainer takes (module doc)."""
    kind = dataset_kind(dataset.column_names)
    if kind == "prompt_completion" and len(dataset) and not isinstance(dataset[0]["prompt"], str):
        dataset = dataset.map(lambda row: {"messages": row["prompt"] + row["completion"]}, num_proc=num_proc,
                              cache_file_name=_scratch_cache("messages"))
        kind = "messages"
    if kind == "messages" and not tokenizer.chat_template:
        raise SFTDataError(
            f"The tokenizer of '{tokenizer.name_or_path}' has no chat template, so `messages` cannot be rendered. "
            "Set `chat_template_path:` in the recipe to a .jinja file or to a tokenizer whose template to copy "
            "(e.g. meta-llama/Meta-Llama-3-8B-Instruct), or start from a checkpoint that has one."
        )
    if kind == "packed":
        if "mask" not in dataset.column_names:
            logger.warning("The packed SFT dataset has no `mask` column: every token is a loss target.")
        mapped = dataset.map(_packed_rows, batched=True, num_proc=num_proc, desc="Reading packed SFT rows",
                             cache_file_name=_scratch_cache("packed"))
        keep_columns = ["input_ids", "labels", "seq_lengths"]
    else:
        function = _tokenize_messages if kind == "messages" else _tokenize_prompt_completion
        mapped = dataset.map(
            function, batched=True, with_indices=True, fn_kwargs={"tokenizer": tokenizer}, num_proc=num_proc,
            remove_columns=dataset.column_names, desc="Tokenizing SFT data with assistant masks",
            cache_file_name=_scratch_cache("tokenized"),
        )
        keep_columns = ["input_ids", "assistant_masks" if kind == "messages" else "completion_mask"]

    lengths = np.asarray(mapped["length"], dtype=np.int64)
    targets = np.asarray(mapped["num_targets"], dtype=np.int64)
    too_long = lengths > max_length
    if kind == "packed" and too_long.any():
        raise SFTDataError(
            f"Packed rows of up to {lengths.max()} tokens exceed max_length={max_length}; re-pack with "
            f"`prolong-data pack --mode sft --length {max_length}` or raise max_length."
        )
    no_target = ~too_long & (targets == 0)
    keep = np.flatnonzero(~too_long & ~no_target)
    stats = SFTDataStats(
        kind=kind, examples=len(lengths), kept=len(keep), dropped_too_long=int(too_long.sum()),
        dropped_no_target=int(no_target.sum()), tokens=int(lengths[keep].sum()), target_tokens=int(targets[keep].sum()),
    )
    if stats.dropped_too_long:
        logger.warning("Dropped %d conversation(s) longer than max_length=%d (never truncated).",
                       stats.dropped_too_long, max_length)
    if stats.dropped_no_target:
        logger.warning("Dropped %d conversation(s) with no assistant token to learn.", stats.dropped_no_target)
    if not stats.kept:
        raise SFTDataError(f"No trainable example is left ({stats}); check max_length and the roles.")
    logger.info("SFT data: %s", stats)
    if len(keep) < len(lengths):
        mapped = mapped.select(keep)
    return mapped.select_columns(keep_columns), stats
