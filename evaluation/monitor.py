"""Evaluation during training (`config.eval`): a dense evaluation of the current teacher every few epochs.

The original logs a validation score after every training epoch; here `eval.every_epochs = n` runs an
evaluation job config (`configs/eval/*.py`, e.g. VOC overclustering on a val tree) on the teacher backbone at
the end of every n-th epoch, through the same runner as `python -m evaluation`, writes its results under
`workdir/eval/epoch_<e>/` and logs `eval_miou` to metrics.jsonl. The teacher is evaluated as it is in memory
(its weights are in the checkpoints). Off by default (0), and then nothing of this module is built. The
trainer does not import the evaluation package: main.py hands `make_monitor` to
`neco_jax.train.train_and_evaluate`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import jax

from evaluation import jobs, runner
from neco_jax.errors import ConfigError
from neco_jax.settings import EvalSettings


class EvalMonitor:
    """Builds and checks the evaluation job once (before training), then runs it when an epoch ends."""

    def __init__(self, e: EvalSettings, workdir: str | os.PathLike, steps_per_epoch: int):
        if jax.process_count() > 1:
            raise ConfigError("config.eval.every_epochs runs in single-process training only; set it to 0")
        self.every = int(e.every_epochs)
        self.steps_per_epoch = steps_per_epoch
        self.workdir = Path(workdir) / "eval"
        self.job = jobs.load_config_file(e.config)
        values = jobs.parse_overrides([s for s in e.set.split(";") if s.strip()])
        # The teacher is evaluated in memory; `checkpoint` only names it in the results.
        values.update(data_dir=e.data_dir, workdir=str(self.workdir), checkpoint=f"the teacher of {workdir}")
        try:
            self.job.update_from_flattened_dict(values)
        except (TypeError, ValueError, KeyError, AttributeError) as err:
            raise ConfigError(f"config.eval.set does not fit {e.config}: {' '.join(str(err).split())}") from err
        runner.validate(self.job)
        jobs.check_job_data(self.job)  # a missing data folder stops now, not after the first epoch

    def due(self, step: int) -> bool:
        return step % self.steps_per_epoch == 0 and (step // self.steps_per_epoch) % self.every == 0

    def run(self, teacher_backbone, step: int) -> dict[str, Any]:
        """Evaluate the teacher backbone (an NNX module, in memory) at the end of the epoch that `step` closes."""
        epoch = step // self.steps_per_epoch
        start = time.perf_counter()
        job = self.job.copy_and_resolve_references()
        job.checkpoint = f"{job.checkpoint} at step {step}"
        job.workdir = str(self.workdir / f"epoch_{epoch:03d}")
        results = runner.run_job(job, teacher_backbone)
        return {"eval_miou": float(results["miou"]), "eval_epoch": epoch, "eval_s": time.perf_counter() - start}


def make_monitor(settings: EvalSettings, workdir, steps_per_epoch: int) -> EvalMonitor | None:
    """The monitor of the `config.eval` settings, or None when it is off (every_epochs = 0)."""
    return EvalMonitor(settings, workdir, steps_per_epoch) if settings.every_epochs else None
