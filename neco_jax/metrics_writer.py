"""Training metrics without TensorFlow: JSON lines in the workdir, a console progress line, and TensorBoard
event files (workdir/tensorboard) when tensorboardX (the `tensorboard` extra) is importable.

Only process 0 writes. `StepClock` splits each step's wall time into waiting for data and the rest
(dispatch + device compute, measured when the step's results are fetched), which is what tells an
input-bound run from a compute-bound one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"
REPLACED_FILE = "metrics.replaced.jsonl"


def _format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsWriter:
    """Appends `{"step": s, ...}` lines to workdir/metrics.jsonl and mirrors them to TensorBoard if available."""

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool | None = None, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(os.fspath(workdir), METRICS_FILE)
        self._tb = None
        # tensorboardX is imported now (a second or more), not inside the steps that the second row times; its
        # writer is made with the first row, so that a run stopped before it leaves no empty tensorboard/ folder.
        self._tb_class = _summary_writer_class() if self.enabled and tensorboard else None
        self._tb_dir = os.path.join(os.fspath(workdir), "tensorboard") if self._tb_class else None
        if self.enabled:
            os.makedirs(os.fspath(workdir), exist_ok=True)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb_dir is not None:
            self._tb, self._tb_dir = self._tb_class(self._tb_dir), None
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, global_step=int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _scalar(v: Any) -> Any:
    a = np.asarray(v)
    if a.ndim == 0:
        return a.item()
    return a.tolist()


def _summary_writer_class():
    """tensorboardX's event-file writer (pure Python + protobuf), or None without the `tensorboard` extra."""
    try:
        from tensorboardX import SummaryWriter  # the optional tensorboard extra
    except ImportError:
        return None
    return SummaryWriter


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every row of workdir/metrics.jsonl, in order."""
    with open(os.path.join(os.fspath(workdir), METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]


def set_aside_rows_after(workdir: str | os.PathLike, step: int) -> int:
    """On resume from checkpoint `step`: move the rows of later steps (which the resumed run computes again)
    from metrics.jsonl to metrics.replaced.jsonl, each marked with the step the run resumed from, so that
    metrics.jsonl holds one row per step and nothing is lost. Returns how many rows were moved."""
    path = os.path.join(os.fspath(workdir), METRICS_FILE)
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    keep, replaced = [], []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by a kill
            row = {"unparsable_row": line.strip()}
        if row.get("step", step + 1) > step:
            replaced.append(json.dumps({**row, "replaced_on_resume_from_step": step}) + "\n")
        else:
            keep.append(line if line.endswith("\n") else line + "\n")
    if replaced:
        with open(os.path.join(os.fspath(workdir), REPLACED_FILE), "a") as f:
            f.writelines(replaced)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
    return len(replaced)


class StepClock:
    """Accumulates data-wait and compute time between reports; gives images/s and the ETA."""

    def __init__(self, total_steps: int, global_batch: int, start_step: int):
        self.total_steps, self.global_batch = total_steps, global_batch
        self._t0 = time.perf_counter()
        self._window_start, self._window_step = self._t0, start_step
        self.data_wait = 0.0
        self._mark = self._t0

    def data_ready(self) -> None:
        """Call when the next batch is in hand: the time since the last mark was spent waiting for data."""
        now = time.perf_counter()
        self.data_wait += now - self._mark
        self._mark = now

    def step_done(self) -> None:
        """Call after the step's results were fetched: the time since `data_ready` was compute."""
        self._mark = time.perf_counter()

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` spent outside training (an evaluation) out of the rates and the ETA."""
        self._window_start += seconds
        self._mark += seconds

    def report(self, step: int) -> dict[str, float]:
        """Rates over the window since the last report, then start a new window."""
        now = time.perf_counter()
        elapsed = max(now - self._window_start, 1e-9)
        steps = max(step - self._window_step, 1)
        out = {
            "images_per_s": steps * self.global_batch / elapsed,
            "step_time_s": elapsed / steps,
            "data_wait_s": self.data_wait / steps,
            "compute_s": max(elapsed - self.data_wait, 0.0) / steps,
            "eta_s": (self.total_steps - step) * elapsed / steps,
        }
        self._window_start, self._window_step, self.data_wait = now, step, 0.0
        return out


def progress_line(step: int, total: int, metrics: dict[str, Any]) -> str:
    """`step 120/46200 (0.3%) | loss 3.8412 | 85.3 img/s | data 12% | 0.75 s/step | ETA 9h41m`."""
    frac_data = metrics["data_wait_s"] / max(metrics["step_time_s"], 1e-9)
    return (
        f"step {step}/{total} ({100 * step / max(total, 1):.1f}%) | loss {metrics['loss']:.4f} | "
        f"{metrics['images_per_s']:.1f} img/s | data {100 * frac_data:.0f}% | "
        f"{metrics['step_time_s']:.3f} s/step | ETA {_format_duration(metrics['eta_s'])}"
    )


def log_parameter_overview(params: Any, name: str) -> None:
    """clu's table of every parameter (shape, size, mean, std) plus the total, to the log."""
    from clu import parameter_overview  # a slow import, for this table only (curves.py imports this module too)

    log.info("%s parameters:\n%s", name, parameter_overview.get_parameter_overview(params, include_stats=False))
