"""The package's shape: console scripts installed by `pip install -e .` (what `make setup` runs)."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {
    "prolong-data": "prolong.data.cli:main",
    "prolong-cpt": "prolong.run_cpt:cli",
    "prolong-sft": "prolong.run_sft:cli",
    "prolong-eval": "evaluation.run:main",
}


def test_console_scripts_are_installed():
    installed = {ep.name: ep.value for ep in entry_points(group="console_scripts") if ep.name in SCRIPTS}
    assert installed == SCRIPTS
    bindir = os.path.dirname(sys.executable)
    for name in SCRIPTS:
        assert os.access(os.path.join(bindir, name), os.X_OK), f"{name} not in {bindir}: run `make setup`"


BIN = os.path.dirname(sys.executable)


@pytest.mark.parametrize("command, expected", [
    ([os.path.join(BIN, "prolong-cpt")], "--max_steps"),
    ([os.path.join(BIN, "prolong-eval")], "--lengths"),
    ([sys.executable, os.path.join(ROOT, "prolong", "run_sft.py")], "--max_length"),  # as README shows
], ids=["prolong-cpt", "prolong-eval", "python prolong/run_sft.py"])
def test_entry_point_help(command, expected, tmp_path):
    """Run from outside the checkout, with no sys.path edit: `prolong` comes from the editable install."""
    result = subprocess.run([*command, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:") and expected in result.stdout, result.stdout[:300]
