"""Keep tokens, keys and passwords out of everything a run writes (model card, logs, output_dir, the Hub).

* ``--hub_token`` is moved into the process environment (``HF_TOKEN``, which huggingface_hub reads
  on every call) and cleared from the TrainingArguments: the Trainer pickles its whole arguments
  object into ``training_args.bin`` in every checkpoint and in output_dir, and uploads it with
  ``push_to_hub``. transformers masks ``*_token`` fields only in ``to_dict()``/``repr()`` (logs,
  TensorBoard, W&B), not in that pickle.
* ``redact`` replaces secret-looking fields (``*_token`` like transformers, ``*api_key*``,
  ``*password*``, ``*secret*``) and any value equal to a secret held in the environment, in a
  recipe before it is written anywhere (the model card's recipe copy).
"""

from __future__ import annotations

import os
import re

REDACTED = "<redacted>"
# Field names whose value is a credential. Tokenizer special tokens (`eos_token: "</s>"`) also end in
# `_token`; masking those in a recipe copy costs nothing, leaking a hub token costs a lot.
SECRET_FIELD = re.compile(r"(^|_)token$|api_?key|password|passwd|secret|credential", re.IGNORECASE)
SECRET_ENV = re.compile(r"token|api_?key|password|passwd|secret|credential", re.IGNORECASE)
_TOKENIZER_FIELDS = {"eos_token", "bos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token"}


def environment_secrets() -> list[str]:
    """Values of environment variables named like credentials (HF_TOKEN, OPENAI_API_KEY, ...)."""
    return sorted({value for name, value in os.environ.items() if SECRET_ENV.search(name) and len(value) >= 8},
                  key=len, reverse=True)


def is_secret_field(name: str) -> bool:
    return bool(SECRET_FIELD.search(name)) and name not in _TOKENIZER_FIELDS


def redact(value, secrets: list[str] | None = None):
    """A copy of ``value`` (dicts, lists, strings) with secret fields and known secret values masked."""
    secrets = environment_secrets() if secrets is None else secrets
    if isinstance(value, dict):
        return {key: (REDACTED if is_secret_field(str(key)) and item not in (None, "", False)
                      else redact(item, secrets)) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(item, secrets) for item in value]
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
    return value


def move_hub_token_to_environment(args) -> None:
    """Take ``args.hub_token`` out of the TrainingArguments (see the module docstring) and give it to
    huggingface_hub through ``HF_TOKEN`` instead; every Hub call of the Trainer then still has it."""
    token = getattr(args, "hub_token", None)
    if token:
        os.environ["HF_TOKEN"] = token
        args.hub_token = None
