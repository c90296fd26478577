"""One evaluation job: a protocol on a dataset for a checkpoint, results in the job's workdir.

    python -m evaluation --config=configs/eval/<dataset>_<protocol>.py --config.checkpoint=SOURCE \
        --config.data_dir=DIR --config.workdir=OUT [--config.<field>=VALUE ...]

The job config files and their fields: configs/eval/ (README "Evaluation"). Writes OUT/results.json and
OUT/results.txt (evaluation/runner.py) and the protocol's pictures. A mistake in the command line, the config or
the data: one line, exit status 2.
"""

from absl import flags
from ml_collections import config_flags

from evaluation import runner
from neco_jax import program

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Evaluation job config file (configs/eval/<dataset>_<protocol>.py).", lock_config=True
)
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
    program.flags_only(argv)
    runner.run_job(_CONFIG.value)


if __name__ == "__main__":
    program.run(main)
