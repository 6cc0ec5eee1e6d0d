"""Raw data files and chat turns, as `prolong-data tokenize` and SFT read them."""

from __future__ import annotations

import os

CHAT_ROLES = ("system", "user", "assistant", "tool")
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_COMPRESSED = (".gz", ".zst")  # datasets decompresses these itself (by the file name)
DATA_FILE_ENDINGS = tuple(sorted(_BUILDERS)) + tuple(f"{e}{c}" for e in (".jsonl", ".json", ".csv") for c in _COMPRESSED)


def data_file_builder(path: str | os.PathLike) -> str | None:
    """The `datasets` builder that reads a data file (json, parquet or csv; json and csv also
    .gz/.zst-compressed), by its name; None for any other file."""
    name = os.fspath(path).lower()
    if not name.endswith(DATA_FILE_ENDINGS):
        return None
    for compression in _COMPRESSED:
        name = name.removesuffix(compression)
    return _BUILDERS[os.path.splitext(name)[1]]


def root_cause(error: BaseException) -> BaseException:
    """The reader's own error: datasets wraps it in a DatasetGenerationError naming nothing."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def read_data_file(path: str | os.PathLike, cache_dir: str | None = None):
    """A data file (see data_file_builder) as one `datasets.Dataset`; ValueError naming the file when it
    is empty or its reader fails."""
    import datasets

    builder = data_file_builder(path)
    if builder is None:
        raise ValueError(f"cannot read {path}: not a data file ({', '.join(DATA_FILE_ENDINGS)})")
    if os.path.getsize(path) == 0:
        raise ValueError(f"input {path} is empty (0 bytes): nothing to tokenize")
    try:
        return datasets.load_dataset(builder, data_files=os.fspath(path), split="train", cache_dir=cache_dir)
    except Exception as error:  # datasets' DatasetGenerationError is no ValueError
        cause = root_cause(error)
        raise ValueError(f"could not read {path} as {builder} ({type(cause).__name__}: {cause}); check that it is "
                         "valid UTF-8 " + {"json": "JSON lines", "csv": "CSV with a header row"}.get(builder, builder)) from error


def plain_messages(messages: list[dict], first_turn: int = 1) -> list[dict]:
    """The turns with string content: OpenAI-style content parts (`[{"type": "text", "text": ...}]`) are
    joined with newlines (as vLLM's server does); a part that is not text (an image) cannot be trained
    on and is refused (the message counts turns from `first_turn`)."""
    turns = []
    for number, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            texts = []
            for part in content:
                if isinstance(part, str):
                    texts.append(part)
                elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                else:
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ValueError(f"turn {number + first_turn}: a content part of type {kind!r}; only text parts "
                                     "({\"type\": \"text\", \"text\": ...}) can be tokenized: drop the other parts")
            message = {**message, "content": "\n".join(texts)}
        turns.append(message)
    return turns


def chat_turns(messages: list, first_turn: int = 1) -> list[dict]:
    """A conversation's turns with string contents (content parts joined), each checked: a dict with a
    known string `role` and string `content` (or `tool_calls`); otherwise ValueError ``turn N: ...``
    (N counted from `first_turn`). A bad turn would fail inside the chat template, render as an empty
    turn, or (an unknown role) be trained on as something it is not."""
    turns = plain_messages(messages, first_turn)
    for number, turn in enumerate(turns, start=first_turn):
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str)
                and (isinstance(turn.get("content"), str) or turn.get("tool_calls"))):
            shown = sorted(turn) if isinstance(turn, dict) else type(turn).__name__
            raise ValueError(f"turn {number}: a chat turn needs string 'role' and 'content' (got {shown})")
        if turn["role"] not in CHAT_ROLES:
            raise ValueError(f"turn {number}: unknown role {turn['role']!r}; roles are {', '.join(CHAT_ROLES)}. "
                             "Map the dataset's roles first (e.g. human -> user, gpt -> assistant)")
    return turns
