"""Hub ids, `hf://datasets/...` addresses and local paths: which one a name is, checked before any work.

A name that exists on disk is a path. Anything else is taken for a Hub id only if it has the Hub's
form (``org/name``, no data-file ending) and its first component is not a local directory; then
huggingface_hub says whether that repository can be used (in the local cache, or found on the Hub).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from prolong.errors import RecipeError

_DATA_FILE_ENDINGS = (".json", ".jsonl", ".yaml", ".yml", ".parquet", ".csv", ".txt", ".arrow", ".gz", ".zst")
_HF_DATASET_ADDRESS = re.compile(
    r"hf://datasets/(?P<repo>[^/@]+/[^/@]+)(?:@(?P<revision>[^/]+))?(?:/(?P<config>[^/]+))?/?")


def looks_like_hub_id(name: str) -> bool:
    """``org/name`` with no leading ``.``, ``/`` or ``~`` and no data-file ending (a dot inside is
    allowed: ``Qwen/Qwen2.5-7B``): the form of a Hub repository id, for models, tokenizers, SFT
    datasets and prolong-data inputs alike."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name)) and not name.lower().endswith(_DATA_FILE_ENDINGS)


@dataclass(frozen=True)
class HubDatasetAddress:
    repo_id: str
    revision: str | None  # None: the default branch
    config: str | None  # None: the repository's only config


def parse_hf_dataset_address(text: str) -> HubDatasetAddress | None:
    """``hf://datasets/ORG/NAME[@REVISION][/CONFIG]`` in its parts; None for anything else."""
    match = _HF_DATASET_ADDRESS.fullmatch(str(text))
    return HubDatasetAddress(match["repo"], match["revision"], match["config"]) if match else None


def transport_errors() -> type[Exception]:
    """The HTTP client's base error (huggingface_hub 2.x ships httpx2; 1.x used httpx)."""
    try:
        import httpx2 as client
    except ImportError:
        import httpx as client
    return client.HTTPError


def hub_errors() -> tuple[type[Exception], ...]:
    """What a failed Hub call raises."""
    from huggingface_hub.errors import HfHubHTTPError

    return HfHubHTTPError, transport_errors()


def _in_hub_cache(repo_id: str, repo_type: str) -> bool:
    from huggingface_hub import constants  # the cache's folder layout is huggingface_hub's

    return os.path.isdir(os.path.join(constants.HF_HUB_CACHE, f"{repo_type}s--{repo_id.replace('/', '--')}"))


def hub_repo_problem(repo_id: str, repo_type: str = "model") -> str | None:
    """Why the Hub repository cannot be used from here, or None if it can (it is in the local cache,
    or the Hub says it exists): huggingface_hub's own answer, offline mode included."""
    if _in_hub_cache(repo_id, repo_type):
        return None
    from huggingface_hub import repo_exists
    from huggingface_hub.errors import OfflineModeIsEnabled

    try:
        if repo_exists(repo_id, repo_type=repo_type):
            return None
        return f"the Hub has no {repo_type} {repo_id} (a private one needs HF_TOKEN)"
    except OfflineModeIsEnabled:
        return "it is not in the local cache and HF_HUB_OFFLINE is set"
    except (*hub_errors(), OSError):
        return "it is not in the local cache and the Hub cannot be reached from here"


def _did_you_mean(path: str) -> str:
    import difflib

    parent, name = os.path.split(os.path.normpath(path))
    try:
        siblings = os.listdir(parent or ".")
    except OSError:
        return ""
    close = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
    return f"; did you mean {os.path.join(parent, close[0])}?" if close else ""


def require_path_or_hub_id(value: str, field: str, repo_type: str = "model", hint: str = "") -> None:
    """Refuse at once (RecipeError ``FIELD: not found: VALUE``) a value that is neither an existing
    path nor a usable Hub id (module doc): a missing local path fails here, not after the loader's
    minute of Hub retries."""
    if os.path.exists(value):
        return
    if looks_like_hub_id(value) and not os.path.isdir(value.split("/", 1)[0]):
        problem = hub_repo_problem(value, repo_type)
        if problem is None:
            return
        raise RecipeError(f"{field}: not found: {value} (no such local path; as a Hub id {problem})."
                          + (f" {hint}" if hint else ""))
    message = f"{field}: not found: {value}{_did_you_mean(value)}"
    raise RecipeError(message + ("" if message.endswith("?") else ".") + (f" {hint}" if hint else ""))
