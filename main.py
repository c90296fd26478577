"""NeCo post-training entry point.

    python main.py --config=configs/dinov2_s14.py --workdir=runs/s14 [--config.optim.batch_size=32 ...]
    python main.py --config=configs/dinov2r_xr_s14.py:odd_even --workdir=runs/ablation_odd_even
    python main.py --config=configs/demo.py --workdir=runs/demo          # CPU demo on the bundled photos

A workdir that already holds a checkpoint resumes from it. An unknown config field or a bad value stops
with one line naming it (exit status 2).
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from neco_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and exports.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save INFO chatter would bury the progress
    from neco_jax import train

    try:
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
