"""One command for a checkpoint's whole table: every protocol whose data exists, side by side with the paper.

    python -m evaluation.suite --checkpoint=CKPT --data_dir=DATA --workdir=OUT \
        [--protocols=linear,overcluster,hummingbird,cbfe] [--set=image_size=448 --set=linear.epochs=25 ...]

Runs each job config ``configs/eval/<dataset>_<protocol>.py`` of the chosen protocols whose dataset is found
in DATA or one of its sub-folders (the layouts of ``evaluation/datasets.py``), each in OUT/<dataset>_<protocol>
through the same runner as ``python -m evaluation``. ``--set`` overrides a config field in every job that has
it. Writes OUT/results.json, OUT/table.md and OUT/results.png (``evaluation/table.py``). A failing job is recorded
and the others still run; the exit status is then 1. A mistake in the command line: one line, exit status 2.
"""

from pathlib import Path

from absl import flags

from evaluation import jobs, protocols, table
from neco_jax import program
from neco_jax.errors import print_error

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Anything --config.checkpoint accepts.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Folder holding the datasets (or one dataset).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder.")
_PROTOCOLS = flags.DEFINE_list("protocols", list(protocols.NAMES), "Comma-separated subset of the protocols.")
_SET = flags.DEFINE_multi_string("set", [], "FIELD=VALUE: a config override for every job that has the field.")
_PAPER_ROW = flags.DEFINE_string("paper_row", "", "NeCo README row to compare with (default: guessed).")
flags.mark_flags_as_required(["checkpoint", "data_dir", "workdir"])


def main(argv: list[str]) -> int:
    program.flags_only(argv)
    summary = table.run_suite(
        _CHECKPOINT.value,
        _DATA_DIR.value,
        _WORKDIR.value,
        _PROTOCOLS.value,
        jobs.parse_overrides(_SET.value),
        _PAPER_ROW.value,
    )
    if not summary["results"]:
        return print_error(f"no protocol ran; see {Path(_WORKDIR.value) / 'results.json'} for the reasons")
    return 1 if any(j["status"] == "error" for j in summary["jobs"]) else 0


if __name__ == "__main__":
    program.run(main)
