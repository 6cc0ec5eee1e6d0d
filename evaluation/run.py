"""python -m evaluation.run --config evaluation/configs/recall.yaml --model PATH [--key value ...]

Every config key (evaluation/config.py EvalSettings) is accepted as --key VALUE; values are read as
YAML scalars ("true", "3", "null"), lists as comma-separated text (--lengths 8k,16k).
"""
import argparse
import logging
import sys

import yaml

from prolong.errors import cli_errors
from prolong.redaction import redact_cli_output

from .config import DEFAULTS, SETTINGS, TEXT_KEYS
from .runner import evaluate


def parse_args(argv=None) -> tuple[str | None, dict]:
    parser = argparse.ArgumentParser(prog="evaluation.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)  # --max_sample must not pass for --max_samples
    parser.add_argument("--config", help="YAML file with config keys")
    parser.add_argument("--update-card", "--update_card", dest="update_card", metavar="MODEL_DIR",
                        help="put the category scores into MODEL_DIR/README.md (model-index + Evaluation section)")
    for key, setting in SETTINGS.items():
        parser.add_argument(f"--{key}", dest=key, default=None,
                            help=f"{setting.metadata['help']} (default: {DEFAULTS[key]!r})".replace("%", "%%"))
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unknown option(s) {' '.join(unknown)}; config keys are: {', '.join(sorted(DEFAULTS))}")
    overrides = {}
    for key in DEFAULTS:
        value = getattr(args, key)
        if value is not None:
            try:
                overrides[key] = value if key in TEXT_KEYS else yaml.safe_load(value)
            except yaml.YAMLError as error:
                parser.error(f"--{key} {value!r}: not a value ({str(error).splitlines()[0]}); give a number, "
                             "true/false, null or text")
    if args.update_card:  # not an evaluation setting: main() takes it out again
        overrides["update_card"] = args.update_card
    return args.config, overrides


@cli_errors("evaluation.run")  # expected errors: one message, no traceback, exit 2
def main(argv=None):
    redact_cli_output()  # logs, progress and the error line: no judge key or URL credentials
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config, overrides = parse_args(argv)
    update_card = overrides.pop("update_card", None)
    if update_card:  # checked before the (long) evaluation, not after
        from prolong.model_card import check_updatable_card
        check_updatable_card(update_card)
    from .config import load_config
    model = load_config(config, overrides)["model"]
    if not model:
        raise ValueError("no model given (--model PATH or `model:` in the config)")
    overrides.pop("model", None)
    scores = evaluate(model, config=config, **overrides)
    for category, by_length in scores["categories"].items():
        print(category, {n: round(v, 1) for n, v in by_length.items() if v is not None})
    print(f"report: {scores['config']['output_dir']}/report.md")
    if update_card:
        from prolong.model_card import update_model_card
        update_model_card(update_card, scores)
        print(f"model card: {update_card}/README.md (model-index updated)")
    if scores["failed"]:  # the others were run and reported; the exit status still says so
        print(f"failed (see the log and report.md): {', '.join(scores['failed'])}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()  # wrapped by cli_errors above: expected errors print one message and exit 2
