"""NeCo post-training entry point.

    python main.py --config=configs/dinov2_s14.py --workdir=runs/s14 [--config.optim.batch_size=32 ...]
    python main.py --config=configs/dinov2r_xr_s14.py:odd_even --workdir=runs/ablation_odd_even
    python main.py --config=configs/demo.py --workdir=runs/demo          # CPU demo on the bundled photos

A workdir that already holds a checkpoint resumes from it (with the same config, unless
--allow_config_change). Exit status: 0 finished; 2 bad input (a missing config file, an unknown config
field, section or argument, a bad value, an unwritable workdir...: one line naming it); 128 + the signal
number (143 for SIGTERM, 130 for SIGINT) when a signal stopped the run after saving a checkpoint, which the
same command resumes; 1 anything else.
"""

import logging
import sys

from absl import flags
from ml_collections import config_flags

from neco_jax import program

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/*.py[:arg]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and exports.")
_ALLOW_CHANGE = flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Resume a workdir's checkpoint under a config that changes the computation (learning rate, total steps...); "
    "the earlier config is kept as config.<n>.json.",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    program.flags_only(argv)
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save INFO chatter would bury the progress
    # Imported after the flags are parsed: a bad command line is answered before JAX loads.
    from evaluation.monitor import make_monitor
    from neco_jax import train

    result = train.train_and_evaluate(
        _CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CHANGE.value, make_monitor=make_monitor
    )
    if result["stopped_by_signal"] is not None:  # a scheduler sees "stopped, resumable", not "finished"
        sys.exit(128 + result["stopped_by_signal"])


if __name__ == "__main__":
    program.run(main)
