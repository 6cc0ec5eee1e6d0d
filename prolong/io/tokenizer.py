"""The one tokenizer loader of `prolong-data`, the training entry points and evaluation."""

from __future__ import annotations

from pathlib import Path

from prolong.errors import RecipeError

from .hub import require_path_or_hub_id


def load_tokenizer(name_or_path: str, gguf_file: str | None = None, *, trust_remote_code: bool = False,
                   field: str = "--tokenizer", hint: str = ""):
    """Any Hugging Face tokenizer: a local directory (optionally with ``gguf_file``) or a Hub id.
    A name that is neither, or a folder holding no tokenizer, is a RecipeError naming ``field``."""
    require_path_or_hub_id(name_or_path, field, hint=hint)
    if gguf_file and Path(name_or_path).is_dir() and not (Path(name_or_path) / gguf_file).is_file():
        raise FileNotFoundError(f"--gguf_file: not found: {Path(name_or_path) / gguf_file}")
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as error:
        if not Path(name_or_path).is_dir():
            raise
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise RecipeError(f"{field}: folder {name_or_path} holds no loadable tokenizer ({first_line})."
                          + (f" {hint}" if hint else "")) from None
    tokenizer.prolong_name = f"{name_or_path}/{gguf_file}" if gguf_file else name_or_path  # for the metadata
    return tokenizer
