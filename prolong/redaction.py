"""Keep tokens, keys and passwords out of everything a run writes (model card, logs, output_dir,
evaluation records and scores, the Hub). Every CLI's outputs go through this one module.

* ``--hub_token`` is moved into the process environment (``HF_TOKEN``, which huggingface_hub reads
  on every call) and cleared from the TrainingArguments: the Trainer pickles its whole arguments
  object into ``training_args.bin`` in every checkpoint and in output_dir, and uploads it with
  ``push_to_hub``. transformers masks ``*_token`` fields only in ``to_dict()``/``repr()`` (logs,
  TensorBoard, W&B), not in that pickle.
* ``redact`` replaces secret-looking fields (``*_token`` like transformers, ``*api_key*``,
  ``*password*``, ``*secret*``), the credentials and query values of URLs
  (``https://user:KEY@host/v1?api_key=KEY``), and any value equal to a known secret: one held in an
  environment variable named like a credential, or one registered with ``register_secret`` (the
  judge's key, a URL's credentials), in a copy of whatever is about to be written.
* ``redact_cli_output`` makes a CLI's stdout/stderr (logs, progress, its one-line error) go
  through the same masking.
"""

from __future__ import annotations

import os
import re
import sys
from urllib.parse import urlsplit, urlunsplit

REDACTED = "<redacted>"
# Field names whose value is a credential. Tokenizer special tokens (`eos_token: "</s>"`) also end in
# `_token`; masking those in a recipe copy costs nothing, leaking a hub token costs a lot.
SECRET_FIELD = re.compile(r"(^|_)token$|api_?key|password|passwd|secret|credential", re.IGNORECASE)
SECRET_ENV = re.compile(r"token|api_?key|password|passwd|secret|credential|(^|_)(key|pass)(_|$)", re.IGNORECASE)
_TOKENIZER_FIELDS = {"eos_token", "bos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token"}
# a URL with credentials (user:pass@), a query or a fragment: those parts may carry a key
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>`]*[@?#][^\s'\"<>`]*")
_MIN_SECRET = 6  # shorter registered values would mask ordinary words
_REGISTERED: set[str] = set()


def environment_secrets() -> list[str]:
    """Values of environment variables named like credentials (HF_TOKEN, OPENAI_API_KEY, ...) and the
    registered secrets, longest first."""
    found = {value for name, value in os.environ.items() if SECRET_ENV.search(name) and len(value) >= 8}
    return sorted(found | _REGISTERED, key=len, reverse=True)


def register_secret(value: str | None) -> None:
    """Mask ``value`` wherever this process writes it from now on (a key read from a variable that is
    not named like one, a password inside a URL)."""
    if value and len(value) >= _MIN_SECRET:
        _REGISTERED.add(value)


def register_url_secrets(url: str | None) -> None:
    """Register a URL's user, password and query/fragment values (``?api_key=...``, Azure's ``sig=``)."""
    if not url:
        return
    try:
        parts = urlsplit(url)
    except ValueError:
        return
    register_secret(parts.password)
    register_secret(parts.username)
    for section in (parts.query, parts.fragment):
        for item in section.split("&"):
            register_secret(item.partition("=")[2])


def redact_url(url: str) -> str:
    """``scheme://<redacted>@host/path?name=<redacted>``: credentials and every query/fragment value masked."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. a malformed IPv6 host: nothing of it is kept
        return REDACTED

    def values(section: str) -> str:
        return "&".join(f"{name}={REDACTED}" if sep else name
                        for name, sep, _ in (item.partition("=") for item in section.split("&"))) if section else ""

    netloc = parts.netloc if "@" not in parts.netloc else f"{REDACTED}@{parts.netloc.rpartition('@')[2]}"
    return urlunsplit((parts.scheme, netloc, parts.path, values(parts.query), values(parts.fragment)))


def is_secret_field(name: str) -> bool:
    return bool(SECRET_FIELD.search(name)) and name not in _TOKENIZER_FIELDS


def redact(value, secrets: list[str] | None = None):
    """A copy of ``value`` (dicts, lists, strings) with secret fields, URL credentials/queries and known
    secret values masked."""
    secrets = environment_secrets() if secrets is None else secrets
    if isinstance(value, dict):
        return {key: (REDACTED if is_secret_field(str(key)) and item not in (None, "", False)
                      else redact(item, secrets)) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(item, secrets) for item in value]
    if isinstance(value, str):
        return mask_secrets(_URL.sub(lambda match: redact_url(match.group(0)), value), secrets)
    return value


def mask_secrets(value, secrets: list[str] | None = None):
    """A copy of ``value`` with only the known secret values masked (records whose text must stay
    as generated: a model's output, a prompt)."""
    secrets = environment_secrets() if secrets is None else secrets
    if isinstance(value, dict):
        return {key: mask_secrets(item, secrets) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [mask_secrets(item, secrets) for item in value]
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
    return value


class RedactingStream:
    """A text stream whose writes are redacted (stdout/stderr of a CLI: logs, progress, errors)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        return self._stream.write(redact(text) if isinstance(text, str) else text)

    def __getattr__(self, name):  # flush, isatty, fileno, encoding, buffer, ...
        return getattr(self._stream, name)


def redact_cli_output() -> None:
    """Route this process's stdout and stderr through ``redact`` (call first thing in a CLI's main,
    before logging is configured: a log handler keeps the stream it was given)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream))


def move_hub_token_to_environment(args) -> None:
    """Take ``args.hub_token`` out of the TrainingArguments (see the module docstring) and give it to
    huggingface_hub through ``HF_TOKEN`` instead; every Hub call of the Trainer then still has it."""
    token = getattr(args, "hub_token", None)
    if token:
        os.environ["HF_TOKEN"] = token
        args.hub_token = None
