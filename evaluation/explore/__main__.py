"""`python -m evaluation.explore ...` (see evaluation/explore/cli.py)."""

import sys

from evaluation.explore.cli import main

sys.exit(main())
