"""`python -m evaluation --config=configs/eval/<dataset>_<protocol>.py --config.checkpoint=... --config.data_dir=...
--config.workdir=...` (see evaluation/runner.py)."""

import sys

from evaluation.runner import main

sys.exit(main())
