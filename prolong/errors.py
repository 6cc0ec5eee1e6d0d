"""Expected errors and how every command line reports them: one message, no traceback, exit 2.

Kept free of heavy imports (torch, transformers) so that any CLI can use it, including the ones
that must fail fast (``evaluation.run``). The ``__main__`` of run_cpt, run_sft, evaluation.run
and prolong.demo runs ``main`` through :func:`cli_errors` (``prolong-data`` does the
same in prolong/data/cli.py); set ``PROLONG_TRACEBACK=1`` to get the full traceback instead.
"""

from __future__ import annotations

import functools
import os
import sys

EXIT_USAGE = 2  # argparse's exit status for bad usage; ours for every expected error


class RecipeError(ValueError):
    """A recipe or command-line value is wrong; the message names the field and the fix."""


def _expected_errors() -> tuple[type[BaseException], ...]:
    """A user's input can be wrong in these ways; anything else is a bug and keeps its traceback.
    ValueError covers RecipeError, json/UnicodeDecodeError and the libraries' bad-value errors;
    OSError covers missing files, existing outputs, permissions and a full disk."""
    errors: list[type[BaseException]] = [ValueError, OSError]
    yaml = sys.modules.get("yaml")  # only if already imported: never import anything here
    if yaml is not None:
        errors.append(yaml.YAMLError)
    for module, name in (("prolong.training.attention", "DocumentMaskingError"), ("prolong.training.attention", "OutputHeadError")):
        error = getattr(sys.modules.get(module), name, None)
        if error is not None:
            errors.append(error)
    return tuple(errors)


def error_message(error: BaseException) -> str:
    text = str(error).strip()
    if isinstance(error, FileNotFoundError) and error.filename and (text.startswith("[Errno") or not text):
        text = f"not found: {error.filename}"  # the OS's "[Errno 2] No such file or directory: ..."
    return text or type(error).__name__


def cli_errors(prog: str):
    """Decorator for a CLI ``main``: an expected error prints ``PROG: error: MESSAGE`` and exits 2."""

    def wrap(main):
        @functools.wraps(main)
        def run(*args, **kwargs):
            from prolong.redaction import redact_cli_output  # light: no torch/transformers

            redact_cli_output()  # logs, progress and the error line of every CLI: no token or URL credential
            try:
                return main(*args, **kwargs)
            except _expected_errors() as error:
                if os.environ.get("PROLONG_TRACEBACK"):
                    raise
                sys.stdout.flush()
                print(f"{prog}: error: {error_message(error)}", file=sys.stderr, flush=True)
                sys.exit(EXIT_USAGE)

        return run

    return wrap


# ---------------------------------------------------------------------------------------------
# Paths that may also be Hub ids


def looks_like_hub_id(name: str) -> bool:
    """``org/name`` with no leading ``.``, ``/`` or ``~`` and no data-file ending: the form of a Hub repository id.

    The one heuristic for models, SFT datasets and prolong-data inputs (a dot inside is allowed:
    ``Qwen/Qwen2.5-7B``).
    """
    import re

    file_endings = (".json", ".jsonl", ".yaml", ".yml", ".parquet", ".csv", ".txt", ".arrow", ".gz", ".zst")
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name)) and not name.lower().endswith(file_endings)


def _in_hub_cache(repo_id: str, repo_type: str) -> bool:
    from huggingface_hub import constants

    return os.path.isdir(os.path.join(constants.HF_HUB_CACHE, f"{repo_type}s--{repo_id.replace('/', '--')}"))


_HUB_REACHABLE: dict[str, bool] = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub answers a TCP connection (once per process): without this, a missing local
    path that looks like a Hub id costs a minute of retries before an unrelated connection error."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    if host not in _HUB_REACHABLE:
        import socket

        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            _HUB_REACHABLE[host] = True
        except OSError:
            _HUB_REACHABLE[host] = False
    return _HUB_REACHABLE[host]


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
    """Refuse at once a ``field`` value that is neither an existing path nor a usable Hub id.

    A value is taken as a Hub id only if it has the form ``org/name``, its first component is not a
    local directory, and the id is in the local Hub cache or the Hub is reachable. Anything else
    that does not exist is reported as ``FIELD: not found: VALUE``.
    """
    if os.path.exists(value):
        return
    first = value.split("/", 1)[0]
    if looks_like_hub_id(value) and not os.path.isdir(first):
        if _in_hub_cache(value, repo_type) or hub_reachable():
            return
        raise RecipeError(
            f"{field}: not found: {value} (no such local path; as a Hub id it is not in the local cache and "
            f"the Hub cannot be reached from here).{' ' + hint if hint else ''}"
        )
    message = f"{field}: not found: {value}{_did_you_mean(value)}"
    raise RecipeError(message + ("" if message.endswith("?") else ".") + (f" {hint}" if hint else ""))
