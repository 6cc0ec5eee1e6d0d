"""Reading what users name: Hub ids, `hf://datasets/...` addresses and local paths (``hub``), raw data
files and chat turns (``files``), and tokenizers (``tokenizer``).

Shared by `prolong-data`, the training entry points and evaluation, so it imports nothing from
``prolong.training``, ``evaluation`` or ``prolong.demo``, and nothing heavy at import time.
"""
