"""What a run is: its stage and the content of its inputs (model, tokenizer, init_from, data).

Recorded in the output_dir's record (ownership.py) and in every checkpoint marker; continuing a run, or
rerunning into its output_dir, needs the same identity. An input is compared by content where it is a
local path (a folder moved elsewhere is the same input, one rebuilt in place is not), by name where it
is a Hub id.
"""

from __future__ import annotations

import fnmatch
import os

import xxhash

from prolong.checkpoint.digest import file_digest, sampled_digest
from prolong.errors import RecipeError

# what from_pretrained reads: a run's output_dir also holds trainer_state.json, the card and checkpoints
MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "*.index.json", "pytorch_model*.bin",
               "*.gguf", "adapter_config.json", "adapter_model.bin")
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.model",
                   "chat_template.*", "*.gguf")
# recipe values that change what the weights compute or which rows are trained (CPT's other stream values are
# checked against the marker's data_stream)
SHAPING_FIELDS = ("gguf_file", "rope_theta", "rope_scaling", "max_length", "use_peft", "lora_r", "lora_alpha",
                  "lora_target_modules")
# datasets' state.json holds a random fingerprint (it differs between identical rebuilds); cache-*: SFT's map caches
_NOT_DATA = ("state.json", "cache-*", ".*", "*.lock")


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


def _folder_files(path: str, patterns=None) -> list[str]:
    """Files of a model folder (top level, by ``patterns``) or of a data folder (every file but _NOT_DATA)."""
    if patterns is not None:
        return sorted(n for n in os.listdir(path) if _matches(n, patterns) and os.path.isfile(os.path.join(path, n)))
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.relpath(os.path.join(root, n), path) for n in files if not _matches(n, _NOT_DATA)]
    return sorted(found)


def input_entry(value: str | None, patterns=None) -> dict | None:
    """{"name": value, "content": digest}; content None where value is not a local path (a Hub id)."""
    if not value:
        return None
    content = None
    if os.path.isfile(value):
        content = (file_digest if patterns is not None else sampled_digest)(value)
    elif os.path.isdir(value):
        digest = xxhash.xxh3_128()
        for name in _folder_files(value, patterns):
            full = os.path.join(value, name)
            digest.update(f"{name}\0{(file_digest if patterns is not None else sampled_digest)(full)}\0".encode())
        content = digest.hexdigest()
    return {"name": str(value), "content": content}


def run_identity(stage: str, args, *configs) -> dict:
    """The identity of the run these recipe objects describe (``configs`` first, then ``args``)."""
    def get(name):
        return next((getattr(c, name) for c in (*configs, args) if getattr(c, name, None) is not None), None)

    model = get("model_name_or_path")
    identity = {"stage": stage, "model_name_or_path": input_entry(model, MODEL_FILES),
                "tokenizer": input_entry(get("tokenizer_name_or_path") or model, TOKENIZER_FILES)}
    if get("init_from"):
        identity["init_from"] = input_entry(get("init_from"), MODEL_FILES)
    if get("dataset_mixture"):
        identity["dataset_mixture"] = {path: input_entry(path) for path in get("dataset_mixture")}
    if get("dataset_name"):
        identity["dataset_name"] = input_entry(get("dataset_name"))
        identity["dataset_config"], identity["dataset_split"] = get("dataset_config"), get("dataset_split")
    identity.update({name: get(name) for name in SHAPING_FIELDS if get(name) is not None})
    return identity


def _entry_change(label: str, old: dict | None, new: dict | None) -> str | None:
    if old is None or new is None:
        same = old == new
    elif old["content"] is not None and new["content"] is not None:
        same = old["content"] == new["content"]
    else:
        same = old["name"] == new["name"]
    if same:
        return None
    if old and new and old["name"] == new["name"]:
        return f"{label} {new['name']} has other content now (rebuilt or replaced at the same path)"
    return f"{label} was {old['name'] if old else 'not set'}, this run has {new['name'] if new else 'not set'}"


def identity_changes(recorded: dict, current: dict) -> list[tuple[str, str]]:
    """(field, what changed) for every part of ``current`` that differs from ``recorded``."""
    changes = []
    for key in sorted(set(recorded) | set(current)):
        old, new = recorded.get(key), current.get(key)
        label = "tokenizer (tokenizer_name_or_path, else model_name_or_path)" if key == "tokenizer" else key
        if key == "dataset_mixture" and set(old or {}) != set(new or {}):
            changes.append((key, f"{key} paths were {sorted(old or {})}, this run has {sorted(new or {})}"))
        elif key == "dataset_mixture":
            for path in sorted(new):
                change = _entry_change(f"{key} path", old[path], new[path])
                changes += [(key, change)] if change else []
        elif isinstance(old, dict) or isinstance(new, dict):
            change = _entry_change(label, old, new)
            changes += [(key if key != "tokenizer" else "tokenizer_name_or_path", change)] if change else []
        elif old != new:
            changes.append((key, f"{key} was {'not set' if old is None else old}, this run has "
                                 f"{'not set' if new is None else new}"))
    return changes


def refuse_changes(recorded: dict, current: dict, what: str) -> None:
    """RecipeError naming each changed field, unless ``current`` is the ``recorded`` run."""
    changes = identity_changes(recorded, current)
    if changes:
        fields = list(dict.fromkeys(field for field, _ in changes))
        raise RecipeError(
            f"{', '.join(fields)}: {what} other inputs: {'; '.join(text for _, text in changes)}. Continue it with "
            "the inputs it was trained on, start over with overwrite_output_dir: true (removes its checkpoints), "
            "or choose another output_dir."
        )
