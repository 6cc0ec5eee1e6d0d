"""Demo builders behind one CLI (`python -m prolong.demo ...`): the tiny model, SmolLM2 export and
micro-ProLong (cli.py), the offline demo corpus (corpus.py, also `prolong-data demo`) and the tiny
SFT recipe's chat data (chat.py)."""
