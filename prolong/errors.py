"""Expected errors and how every command line reports them: one message, no traceback, exit 2.

Kept free of heavy imports (torch, transformers) so that any CLI can use it, including the ones
that must fail fast (``prolong-data``, ``evaluation.run``). Every entry point's ``main`` is
wrapped with :func:`cli_errors`; set ``PROLONG_TRACEBACK=1`` to get the full traceback instead.
"""

from __future__ import annotations

import functools
import os
import sys

EXIT_USAGE = 2  # argparse's exit status for bad usage; ours for every expected error


class RecipeError(ValueError):
    """A recipe or command-line value is wrong; the message names the field and the fix."""


def _expected_errors() -> tuple[type[BaseException], ...]:
    """A user's input can be wrong in these ways; anything else is a bug and keeps its traceback.
    ValueError covers RecipeError, json/UnicodeDecodeError and the libraries' bad-value errors;
    OSError covers missing files, existing outputs, permissions and a full disk."""
    errors: list[type[BaseException]] = [ValueError, OSError]
    yaml = sys.modules.get("yaml")  # only if already imported: never import anything here
    if yaml is not None:
        errors.append(yaml.YAMLError)
    for module, name in (("prolong.attention", "DocumentMaskingError"), ("prolong.attention", "OutputHeadError")):
        error = getattr(sys.modules.get(module), name, None)
        if error is not None:
            errors.append(error)
    return tuple(errors)


def error_message(error: BaseException) -> str:
    text = str(error).strip()
    if isinstance(error, FileNotFoundError) and error.filename and (text.startswith("[Errno") or not text):
        text = f"not found: {error.filename}"  # the OS's "[Errno 2] No such file or directory: ..."
    return text or type(error).__name__


def cli_errors(prog: str):
    """Decorator for a CLI ``main``: an expected error prints ``PROG: error: MESSAGE`` and exits 2."""

    def wrap(main):
        @functools.wraps(main)
        def run(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except _expected_errors() as error:
                if os.environ.get("PROLONG_TRACEBACK"):
                    raise
                sys.stdout.flush()
                print(f"{prog}: error: {error_message(error)}", file=sys.stderr, flush=True)
                sys.exit(EXIT_USAGE)

        return run

    return wrap
