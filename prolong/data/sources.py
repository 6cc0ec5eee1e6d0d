"""Raw inputs for `prolong-data tokenize`: files, saved datasets, Hub ids and code repositories.

Every loader returns a `datasets.Dataset` with the text column (and `domain` when the input has one).
Items that cannot be read (non-UTF-8 or binary files) are kept as rows whose text is None, so the
tokenizer step counts and logs them in one place instead of failing halfway through a corpus.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterator

import datasets
import pyarrow as pa

from prolong.io.files import chat_turns, data_file_builder, read_data_file
from prolong.io.hub import looks_like_hub_id

from .storage import load_dataset_dir

logger = logging.getLogger("prolong.data")

SKIPPED_DIRS = {".git", ".hg", ".svn", "__pycache__", "node_modules", ".tox", ".venv"}


def _decode_utf8(data: bytes) -> str | None:
    """Text of a file (without a leading byte order mark), or None if it is binary (NUL bytes) or not
    valid UTF-8."""
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


def _text_file_records(paths: list[str], one_per_line: bool) -> Iterator[dict]:
    for path in paths:
        data = Path(path).read_bytes()
        if not one_per_line:
            yield {"text": _decode_utf8(data), "source": path, "skipped_files": 0}
            continue
        for line in data.splitlines():
            yield {"text": _decode_utf8(line), "source": path, "skipped_files": 0}


def read_repository(root: Path) -> tuple[str, int, int]:
    """One repository as one document: every UTF-8 file in sorted path order, each preceded by
    its path relative to the repository as a header line (as ProLong built its code documents).
    Returns the text, the number of files skipped as binary or non-UTF-8, and the number skipped as
    empty (a header with no content teaches nothing; a repository of only those is an empty document)."""
    if root.is_file():  # a single-file repository (e.g. a top-level module)
        files = [root]
        base = root.parent
    else:
        files = []
        for directory, subdirs, names in os.walk(root):
            subdirs[:] = sorted(d for d in subdirs if d not in SKIPPED_DIRS)
            files.extend(Path(directory) / name for name in sorted(names))
        base = root
    parts, skipped, empty = [], 0, 0
    for file in files:
        if file.is_symlink() or not file.is_file():
            continue
        text = _decode_utf8(file.read_bytes())
        if text is None:
            skipped += 1
        elif not text.strip():
            empty += 1
        else:
            parts.append(f"{file.relative_to(base).as_posix()}\n{text}")
    return "\n\n".join(parts), skipped, empty


def _repository_records(repos: list[str]) -> Iterator[dict]:
    for repo in repos:
        text, skipped, empty = read_repository(Path(repo))
        yield {"text": text, "source": repo, "skipped_files": skipped, "empty_files": empty}


def list_repositories(directories: list[str], each_is_repository: bool = False) -> list[str]:
    """Each immediate entry (sub-directory, or top-level file) of each directory is one repository;
    with `each_is_repository`, the directories themselves are."""
    repos = []
    for directory in directories:
        path = Path(directory)
        if not path.is_dir():
            raise FileNotFoundError(f"--repos directory not found: {path}")
        if each_is_repository:
            repos.append(str(path))
        else:
            repos.extend(str(p) for p in sorted(path.iterdir())
                         if p.name not in SKIPPED_DIRS and not p.name.startswith("."))
    return repos


_TEXT_FEATURES = datasets.Features({"text": datasets.Value("string"), "source": datasets.Value("string"),
                                    "skipped_files": datasets.Value("int64")})


def load_repositories(directories: list[str], each_is_repository: bool = False, num_proc: int = 1,
                      cache_dir: str | None = None) -> datasets.Dataset:
    repos = list_repositories(directories, each_is_repository)
    if not repos:
        raise ValueError(f"--repos {directories}: no repository (sub-directory) found")
    features = datasets.Features({**_TEXT_FEATURES, "empty_files": datasets.Value("int64")})
    return datasets.Dataset.from_generator(
        _repository_records, gen_kwargs={"repos": repos}, features=features,
        num_proc=min(num_proc, len(repos)) if num_proc > 1 else None, cache_dir=cache_dir)


def load_raw_inputs(inputs: list[str], *, text_field: str = "text", lines: bool = False,
                    split: str = "train", hub_config: str | None = None, num_proc: int = 1,
                    cache_dir: str | None = None, keep_columns: tuple[str, ...] = ()) -> datasets.Dataset:
    """Load jsonl/json/parquet/txt files, `save_to_disk` directories or Hub ids into one Dataset
    (the text field, `domain`, and `keep_columns`: what a data recipe filters or groups rows by)."""
    parts, labels = [], []  # labels: the input each part came from, for error messages
    text_files: list[str] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir() and (path / "state.json").exists():
            parts.append(load_dataset_dir(path, flag="input"))
            labels.append(name)
        elif path.is_dir():
            raise ValueError(f"input {path} is a directory but not a saved dataset; pass its files, or "
                             "--repos to read it as code repositories")
        elif path.is_file():
            if data_file_builder(path):  # rows (a csv too), not one text document
                parts.append(read_data_file(path, cache_dir))
                labels.append(name)
            else:
                text_files.append(str(path))
        elif looks_like_hub_id(name):
            logger.info("%s is not a local path: loading it from the Hugging Face Hub", name)
            try:
                parts.append(datasets.load_dataset(name, hub_config, split=split, cache_dir=cache_dir))
                labels.append(name)
            except Exception as error:
                raise FileNotFoundError(f"input {name!r} is neither a local file/directory nor a loadable Hub "
                                        f"dataset ({type(error).__name__}: {error})") from error
        else:
            raise FileNotFoundError(f"input not found: {name}")
    if text_files:
        parts.append(datasets.Dataset.from_generator(
            _text_file_records, gen_kwargs={"paths": text_files, "one_per_line": lines},
            features=_TEXT_FEATURES, cache_dir=cache_dir,
            num_proc=min(num_proc, len(text_files)) if num_proc > 1 else None))
        labels.append(f"{len(text_files)} text file(s)")
        if text_field != "text":
            parts[-1] = parts[-1].rename_column("text", text_field)
    for part, name in zip(parts, labels):
        if text_field not in part.column_names and len(part) == 0:
            raise ValueError(f"input {name} is empty (no rows): nothing to tokenize")
        if text_field not in part.column_names:
            raise ValueError(f"input {name} has no field {text_field!r} (fields: {part.column_names}); "
                             "pass --text_field with the name of the text field")
        if "source" not in part.column_names:  # text files name themselves; rows of other inputs are checked
            check_text_column(part, text_field, name)
    keep = [text_field, "domain", "skipped_files", "source", *keep_columns]
    parts = [part.remove_columns([c for c in part.column_names if c not in keep]) for part in parts]
    for part, name in zip(parts, labels):
        if "domain" in part.column_names and len(part) and not _is_string(part.features["domain"]):
            raise ValueError(f"input {name}: field 'domain' holds {part.features['domain']} values; a domain is a "
                             "name: make it a string in every row (or leave it out and pass --domain)")
    if len(parts) == 1:
        return parts[0]
    return datasets.concatenate_datasets(_aligned([_with_all_columns(part, parts) for part in parts], labels))


def _is_string(feature) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string", "null")


def _aligned(parts: list[datasets.Dataset], labels: list[str]) -> list[datasets.Dataset]:
    """The parts cast to one set of features (the first part's; a column of nulls takes another part's
    type), so string and large_string or a missing optional field mix; inputs whose fields cannot be
    made alike are named, with the field and both types."""
    target = datasets.Features({column: next((p.features[column] for p in parts
                                              if getattr(p.features[column], "dtype", None) != "null"), feature)
                                for column, feature in parts[0].features.items()})
    aligned = []
    for part, name in zip(parts, labels):
        if part.features == target:
            aligned.append(part)
            continue
        try:
            aligned.append(part.cast(target))
        except (ValueError, TypeError, NotImplementedError, KeyError) as error:  # pyarrow's casts raise ValueErrors
            column = next((c for c in target if part.features.get(c) != target[c]), "?")
            first = next(label for p, label in zip(parts, labels) if p.features.get(column) == target.get(column))
            raise ValueError(f"inputs {first} and {name} disagree on field {column!r}: {target.get(column)} vs "
                             f"{part.features.get(column)} ({type(error).__name__}); give it the same type in every "
                             "file, or tokenize them separately") from None
    return aligned


def check_text_column(part: datasets.Dataset, text_field: str, name: str, nulls_allowed: bool = False) -> None:
    """Every row's `text_field` must be a string (or a chat `messages` list): a missing or
    non-text field is an error naming the row, not a document silently skipped as empty.
    (`nulls_allowed`: null marks an unreadable text file, counted and logged by tokenize.)"""
    if not len(part):  # nothing to check (and an empty column has no type)
        return
    feature = part.features[text_field]
    is_text = isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
    is_chat = isinstance(feature, datasets.List) and isinstance(feature.feature, dict)
    if isinstance(feature, datasets.List) and (is_chat or type(feature.feature).__name__ == "Json"):
        _check_chat_turns(part, text_field, name)
        is_chat = True
    if type(feature).__name__ == "Json":  # datasets' type for a JSON field whose rows mix value types
        for row, value in enumerate(part.data.column(text_field).to_pylist()):
            if value is not None and not isinstance(json.loads(value), str):
                raise ValueError(f"input {name} row {row + 1}: field {text_field!r} is not a string "
                                 f"({value:.60}); every row needs a string {text_field!r}: fix or remove those rows")
    elif not (is_text or is_chat):
        column = part.data.column(text_field)
        first = next((i for i, valid in enumerate(column.is_valid().to_pylist()) if valid), 0)
        raise ValueError(f"input {name} row {first + 1}: field {text_field!r} is not a string "
                         f"(its values are {feature}, e.g. {column[first].as_py()!r:.60}); pass --text_field "
                         "with the field that holds the text (or `messages` for chat data)")
    column = part.data.column(text_field)
    if is_text:
        try:  # pyarrow's JSON reader keeps invalid UTF-8 bytes; they would fail halfway through tokenizing
            column.validate(full=True)
        except pa.ArrowInvalid as error:
            raise ValueError(f"input {name}: field {text_field!r} is not valid UTF-8 text ({error}); convert the "
                             "file to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from error
    if column.null_count and not nulls_allowed:
        first = column.is_null().to_pylist().index(True)
        raise ValueError(f"input {name} row {first + 1}: field {text_field!r} is missing or null "
                         f"({column.null_count} row(s) in all); every row needs a string {text_field!r}: "
                         "fix or remove those rows")


def _check_chat_turns(part: datasets.Dataset, text_field: str, name: str) -> None:
    """Every conversation's turns, checked as SFT checks them (prolong.io.files.chat_turns)."""
    for row, turns in enumerate(part[text_field]):  # decoded: a content of mixed types is a Json feature
        turns = [json.loads(turn) if isinstance(turn, str) else turn for turn in turns or []]  # mixed-key turns
        try:
            chat_turns(turns)
        except ValueError as error:
            raise ValueError(f"input {name} row {row + 1}, {error}; fix or remove that row") from None


def _with_all_columns(part: datasets.Dataset, parts: list[datasets.Dataset]) -> datasets.Dataset:
    # concatenate_datasets needs identical columns: add the missing optional ones as nulls/zeros.
    for column in ("domain", "skipped_files", "source"):
        if any(column in p.column_names for p in parts) and column not in part.column_names:
            value = 0 if column == "skipped_files" else None
            part = part.add_column(column, [value] * len(part))
    return part
