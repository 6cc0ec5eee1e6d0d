"""Expected errors and how every command line reports them: one message, no traceback, exit 2.

Kept free of heavy imports (torch, transformers) so that any CLI can use it, including the ones
that must fail fast (``evaluation.run``). The ``__main__`` of run_cpt, run_sft, evaluation.run
and prolong.demo runs ``main`` through :func:`cli_errors` (``prolong-data`` calls
:func:`report_error` in prolong/data/cli.py); set ``PROLONG_TRACEBACK=1`` to get the full traceback instead.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

import yaml  # light, and every CLI reads YAML anyway (prolong/yaml_files.py)

EXIT_USAGE = 2  # argparse's exit status for bad usage; ours for every expected error


class RecipeError(ValueError):
    """A recipe or command-line value is wrong; the message names the field and the fix."""


class ExpectedError(RuntimeError):
    """Not a bug: the run cannot go on as set up (a missing package, a model the recipe cannot train as
    asked); the message says what to change. Subclass it where such an error is raised."""


def expected_errors() -> tuple[type[BaseException], ...]:
    """A user's input can be wrong in these ways; anything else is a bug and keeps its traceback.
    ValueError covers RecipeError, json/UnicodeDecodeError and the libraries' bad-value errors;
    OSError covers missing files, existing outputs, permissions and a full disk."""
    return ValueError, OSError, yaml.YAMLError, ExpectedError


def error_message(error: BaseException) -> str:
    text = str(error).strip()
    if isinstance(error, FileNotFoundError) and error.filename and (text.startswith("[Errno") or not text):
        text = f"not found: {error.filename}"  # the OS's "[Errno 2] No such file or directory: ..."
    return text or type(error).__name__


def report_error(prog: str, error: BaseException) -> int:
    """Print ``PROG: error: MESSAGE`` for an expected error and return the exit status (2);
    with PROLONG_TRACEBACK=1, raise it instead."""
    if os.environ.get("PROLONG_TRACEBACK"):
        raise error
    logging.getLogger("prolong").debug("details", exc_info=error)
    sys.stdout.flush()
    print(f"{prog}: error: {error_message(error)}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def cli_errors(prog: str):
    """Decorator for a CLI ``main``: an expected error prints ``PROG: error: MESSAGE`` and exits 2."""

    def wrap(main):
        @functools.wraps(main)
        def run(*args, **kwargs):
            from prolong.redaction import redact_cli_output  # light: no torch/transformers

            redact_cli_output()  # logs, progress and the error line of every CLI: no token or URL credential
            try:
                return main(*args, **kwargs)
            except expected_errors() as error:
                sys.exit(report_error(prog, error))

        return run

    return wrap
