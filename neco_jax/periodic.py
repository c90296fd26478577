"""The training loop's periodic actions: each one knows when it is due and keeps its own state.

In the spirit of big_vision's `u.itstime` and clu's periodic actions, the loop (`neco_jax.train`) runs a step
and then asks each action whether it is due at that step (`due(tick)`), in this order:

- `StopAgreement`: a SIGTERM or SIGINT becomes a stop at a step that every process agrees on;
- `NonFiniteCheck`: the host's only round trip, the device's sums fetched and checked (neco_jax/nonfinite.py),
  whenever a log line or a checkpoint is due: no checkpoint ever holds a step whose loss was not checked;
- `Log`: a metrics row (metrics.jsonl, TensorBoard) and the console's progress line;
- `Checkpoint`: the train state with the loader's position, also when stopping;
- `Evaluate`: the evaluation job of `config.eval` on the teacher in memory, at the end of its epochs.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from typing import Any

import jax
from flax import nnx

from neco_jax import distributed, nonfinite
from neco_jax import metrics_writer as mw
from neco_jax import train_state as ts
from neco_jax.checkpoint import Checkpointer
from neco_jax.settings import OptimSettings
from neco_jax.step import empty_sums

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Tick:
    """A finished step as the actions see it."""

    step: int
    last: bool  # the run's last step (its total, or where the caller asked it to stop)
    stopping: int | None  # the signal that every process agreed to stop on at this step, if any


def every(period: int, tick: Tick) -> bool:
    """Due every `period` steps and at the run's last step."""
    return tick.step % period == 0 or tick.last


class StoppedBeforeTheLoop(BaseException):
    """SIGTERM/SIGINT during setup (a BaseException, as KeyboardInterrupt: no `except Exception` takes it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopAgreement:
    """SIGTERM (and SIGINT), installed for the whole run. During setup there is nothing to save yet: a signal
    stops the run at once (`StoppedBeforeTheLoop`). Once the loop runs (`start`), a signal sets a flag, and the
    processes agree on it every `period` steps (and at the last one), so that all of them save the same step
    and stop together; one process acts at the next step."""

    def __init__(self):
        self.signum, self.period, self.looping, self._previous = None, 1, False, {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum
        if not self.looping:
            raise StoppedBeforeTheLoop(signum)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def start(self, period: int) -> None:
        """The loop starts: from here a signal is a checkpoint at an agreed step, checked every `period` steps."""
        self.period, self.looping = period, True

    def due(self, step: int, last: bool) -> bool:
        return jax.process_count() == 1 or step % self.period == 0 or last

    def __call__(self, step: int, last: bool) -> int | None:
        """The agreed signal at `step` (a collective when several processes run), None to carry on."""
        if not self.due(step, last):
            return None
        agreed = distributed.agreed_stop(self.signum, step)
        self.signum = agreed or self.signum
        return agreed


class NonFiniteCheck:
    """Holds the sums the step carries on the device; when due, fetches them with the step's metrics (the host's
    only wait for the device) and checks the non-finite count, then starts new sums."""

    def __init__(self, settings: OptimSettings, checkpoints: str, placement: jax.sharding.Sharding, due_with: tuple):
        self.settings, self.checkpoints, self.placement, self.due_with = settings, checkpoints, placement, due_with
        self.limit = nonfinite.cap(settings)
        self.sums = empty_sums(self.limit, 0, placement)  # placed as the step returns them: no second compilation

    def due(self, tick: Tick) -> bool:
        return any(action.due(tick) for action in self.due_with)

    def __call__(self, tick: Tick, metrics: dict[str, jax.Array]) -> tuple[dict, dict]:
        """(sums, metrics) on the host; NonFiniteError when the count says stop."""
        sums, metrics = distributed.host_copy((self.sums, metrics))
        run = nonfinite.check(sums, tick.step, int(metrics["nonfinite_steps"]), self.settings, self.checkpoints)
        self.sums = empty_sums(self.limit, run, self.placement)
        return sums, metrics


class Log:
    """A metrics row and a progress line every `period` steps: this step's metrics, the means of the loss and the
    gradient norm over the steps since the last row, the skipped-image count and the clock's rates."""

    def __init__(self, period: int, writer: mw.MetricsWriter, clock: mw.StepClock, total_steps: int):
        self.period, self.writer, self.clock, self.total_steps = period, writer, clock, total_steps
        self.steps, self.loss_sum, self.grad_norm_sum = 0, 0.0, 0.0  # since the last row, from every fetch
        self.last: dict[str, Any] = {}

    def due(self, tick: Tick) -> bool:
        return every(self.period, tick)

    def add(self, sums: dict[str, Any]) -> None:
        self.steps += int(sums["steps"])
        self.loss_sum += float(sums["loss_sum"])
        self.grad_norm_sum += float(sums["grad_norm_sum"])

    def means(self) -> dict[str, float]:
        """Window means (NaN if a step of the window was not finite), then start a new window."""
        n = max(self.steps, 1)
        out = {"loss": self.loss_sum / n, "grad_norm_mean": self.grad_norm_sum / n}
        self.steps, self.loss_sum, self.grad_norm_sum = 0, 0.0, 0.0
        return out

    def __call__(self, tick: Tick, metrics: dict[str, Any], bad_files: int) -> None:
        """`bad_files`: the loader's unreadable-file count as of this step's batch (summed over the processes)."""
        row = {
            **{k: v for k, v in metrics.items() if k != "finite"},
            **self.means(),
            "loss_last": float(metrics["loss"]),
            "skipped_images": distributed.total(bad_files)[0],
            **self.clock.report(tick.step),
        }
        self.writer.write(tick.step, row)
        log.info(mw.progress_line(tick.step, self.total_steps, row))
        self.last = row


class Checkpoint:
    """The train state and the loader's position every `period` steps, at the last step and when stopping."""

    def __init__(self, period: int, checkpointer: Checkpointer):
        self.period, self.checkpointer = period, checkpointer

    def due(self, tick: Tick) -> bool:
        return every(self.period, tick) or tick.stopping is not None

    def __call__(self, tick: Tick, state: ts.TrainState, data_state: dict) -> None:
        self.checkpointer.save(tick.step, state, distributed.global_loader_state(data_state))


class Evaluate:
    """The monitor's evaluation (`config.eval`, evaluation/monitor.py) of the teacher in memory when an epoch it
    asks for ends; not when stopping (the scheduler's grace period is for the checkpoint)."""

    def __init__(self, monitor, teacher_def: nnx.GraphDef, writer: mw.MetricsWriter, clock: mw.StepClock):
        self.monitor, self.teacher_def, self.writer, self.clock = monitor, teacher_def, writer, clock

    def due(self, tick: Tick) -> bool:
        return self.monitor is not None and tick.stopping is None and self.monitor.due(tick.step)

    def __call__(self, tick: Tick, state: ts.TrainState) -> None:
        teacher = (state.teacher or state.student)["backbone"]  # the student is its own teacher without one
        row = self.monitor.run(nnx.merge(self.teacher_def, distributed.host_copy(teacher)), tick.step)
        self.writer.write(tick.step, row)
        log.info("epoch %d: eval mIoU %.2f %% (%.0f s)", row["eval_epoch"], 100 * row["eval_miou"], row["eval_s"])
        self.clock.exclude(row["eval_s"])
