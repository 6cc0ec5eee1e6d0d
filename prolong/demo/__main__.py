"""`python -m prolong.demo ...`: see prolong/demo/cli.py."""

import sys

from prolong.demo.cli import main
from prolong.errors import cli_errors

sys.exit(cli_errors("prolong.demo")(main)())  # any other expected error: one message, exit 2
