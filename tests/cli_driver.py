"""Run many command lines of our CLIs in ONE Python process, each exactly as the interpreter runs it.

    python tests/cli_driver.py CASES.json RESULTS.json

CASES.json is a list of ``{"id": ..., "argv": [CLI, arg, ...], "watch": [FOLDER, ...]}``. Each CLI is
executed as its ``python prolong/run_cpt.py`` / ``python -m MODULE`` form would be (``runpy`` with
``__name__ == "__main__"``), its file descriptors 1 and 2 captured, and its exit status taken the
way the interpreter takes it: ``SystemExit``'s code, or 1 and a printed traceback for any other
exception. Its result's ``changed`` lists what it added, removed or rewrote under ``watch`` (a refused
bad input must leave those folders as they were). Why one process: starting Python and importing
transformers costs ~5 s per process on 2 cores, so one process per bad input would not fit in the test budget.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# CLI name -> how a user starts it
ENTRY_POINTS = {
    "run_cpt": ("path", "prolong/run_cpt.py"),
    "run_sft": ("path", "prolong/run_sft.py"),
    "prolong-data": ("module", "prolong.data"),  # the console script runs the same main
    "evaluation.run": ("module", "evaluation.run"),
    "prolong.demo": ("module", "prolong.demo"),
}
CASE_TIMEOUT_S = 120


class CaseTimeout(BaseException):  # not an Exception: no CLI may catch it as an expected error
    pass


def command_line(argv: list[str]) -> list[str]:
    """The real command for ``argv`` (used by the test for cases run in their own process)."""
    kind, target = ENTRY_POINTS[argv[0]]
    return [sys.executable, os.path.join(REPO, target)] + argv[1:] if kind == "path" else \
        [sys.executable, "-m", target] + argv[1:]


def snapshot(folders: list[str]) -> dict[str, tuple[int, int]]:
    """Every path under ``folders`` with its size and modification time (a folder: (-1, 0))."""
    found = {}
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            found.update({os.path.join(root, name): (-1, 0) for name in dirs})
            for name in files:
                path = os.path.join(root, name)
                stat = os.lstat(path)
                found[path] = (stat.st_size, stat.st_mtime_ns)
    return found


def changes(before: dict, after: dict) -> list[str]:
    """``+ path`` added, ``- path`` removed, ``~ path`` rewritten between two snapshots."""
    return sorted([f"+ {p}" for p in after.keys() - before.keys()] + [f"- {p}" for p in before.keys() - after.keys()]
                  + [f"~ {p}" for p in before.keys() & after.keys() if before[p] != after[p]])


def end_of_process() -> None:
    """What the interpreter's exit does that the next case would see: output_dir locks released (atexit there)."""
    ownership = sys.modules.get("prolong.checkpoint.ownership")
    for path in list(getattr(ownership, "_HELD", ())):
        ownership._release(path)


def run_case(argv: list[str], watch: list[str] = ()) -> dict:
    kind, target = ENTRY_POINTS[argv[0]]
    before = snapshot(watch)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.argv = [target] + list(argv[1:])
        start, code = time.time(), 0
        signal.alarm(CASE_TIMEOUT_S)
        try:
            if kind == "path":
                runpy.run_path(os.path.join(REPO, target), run_name="__main__")
            else:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
        except SystemExit as exit_:
            if exit_.code is None or isinstance(exit_.code, int):
                code = exit_.code or 0
            else:  # sys.exit("message") prints the message and exits 1
                print(exit_.code, file=sys.stderr)
                code = 1
        except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
            traceback.print_exc()
            code = 1
        finally:
            signal.alarm(0)
            end_of_process()
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        seconds = time.time() - start
        out.seek(0)
        err.seek(0)
        return {"code": code, "stdout": out.read().decode("utf-8", "replace"),
                "stderr": err.read().decode("utf-8", "replace"), "seconds": round(seconds, 2),
                "changed": changes(before, snapshot(watch))}


def _timeout(signum, frame):
    raise CaseTimeout(f"case ran past {CASE_TIMEOUT_S} s")


def main() -> None:
    cases_path, results_path = sys.argv[1:3]
    with open(cases_path) as f:
        cases = json.load(f)
    signal.signal(signal.SIGALRM, _timeout)
    results = {}
    for case in cases:
        results[case["id"]] = run_case(case["argv"], case.get("watch", []))
        with open(results_path, "w") as f:  # written after every case: a crash keeps what ran
            json.dump(results, f)


if __name__ == "__main__":
    main()
