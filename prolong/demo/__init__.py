"""Demo builders behind one CLI (`python -m prolong.demo ...`, cli.py): the tiny model and SmolLM2
export (smollm2.py), micro-ProLong's data, base and report (micro_data.py, micro_base.py,
micro_report.py), the tiny SFT recipe's chat data (chat.py). The demo corpus of `prolong-data demo`
is prolong/data/demo_corpus.py (data never imports demo)."""
