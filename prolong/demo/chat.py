"""The tiny SFT recipe's chat data: chatterbot-corpus (PyPI, offline) -> a `messages` dataset.

    python -m prolong.demo chatterbot --out demo_data/chatterbot
"""

from __future__ import annotations

import logging
from pathlib import Path

import datasets

from prolong.data.storage import atomic_output_dir

logger = logging.getLogger(__name__)


def build_chatterbot_dataset(out_dir: str, language: str = "english", overwrite: bool = False) -> str:
    """chatterbot-corpus's YAML conversations (PyPI, offline) -> a `messages` dataset saved atomically.

    Each YAML conversation alternates user / assistant turns; a trailing unanswered turn is dropped.
    """
    import chatterbot_corpus
    import yaml

    data_dir = Path(chatterbot_corpus.__file__).parent / "data" / language
    if not data_dir.is_dir():
        raise FileNotFoundError(f"chatterbot-corpus has no '{language}' data ({data_dir}).")
    rows = []
    for path in sorted(data_dir.glob("*.yml")):
        with open(path, encoding="utf-8") as f:
            document = yaml.load(f, Loader=yaml.BaseLoader) or {}  # BaseLoader: "yes" stays a string
        for conversation in document.get("conversations") or []:
            turns = [turn.strip() for turn in conversation if isinstance(turn, str) and turn.strip()]
            turns = turns[: len(turns) // 2 * 2]
            if turns:
                messages = [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(turns)]
                rows.append({"messages": messages, "category": path.stem})
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp))
    logger.info("Wrote %d chatterbot conversations to %s", len(rows), out_dir)
    return str(out_dir)
