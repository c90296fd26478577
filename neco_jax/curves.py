"""Curves of a training run: workdir/metrics.png from workdir/metrics.jsonl (the command line is
`python -m neco_jax.plot`, neco_jax/plot.py).

Six panels over the step: loss, learning rates, weight decay, EMA momentum, gradient norm and images/s.
Every step the run resumed from (a line of workdir/starts.jsonl, the record of the run's starts, with a step
above 0) is marked with a dashed line. Safe while the run is going on: a last line still being
written is skipped, and the picture is replaced atomically. Training writes it at the end of every run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neco_jax.errors import UserError
from neco_jax.files import atomic_write
from neco_jax.metrics_writer import METRICS_FILE
from neco_jax.run_record import STARTS_FILE

PLOT_FILE = "metrics.png"
# (title, [(metrics key, label)], log scale)
PANELS = (
    ("loss", [("loss", "mean since last row"), ("loss_last", "last step")], False),
    ("learning rate", [("lr_backbone", "backbone"), ("lr_heads", "heads")], True),
    ("weight decay", [("weight_decay", None)], False),
    ("EMA momentum (teacher)", [("momentum", None)], False),
    ("gradient norm", [("grad_norm", None)], True),
    ("images / s", [("images_per_s", None)], False),
)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file; a line that does not parse (being written, or cut by a kill) is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def make_figure(rows: Sequence[dict[str, Any]], resumes: Sequence[int], title: str = ""):
    """The six-panel matplotlib Figure for ``rows`` (metrics.jsonl rows), with ``resumes`` marked."""
    from matplotlib.figure import Figure  # a slow import: only when a figure is drawn

    fig = Figure(figsize=(12, 6.5), dpi=80, layout="constrained")
    axes = fig.subplots(2, 3, sharex=True).ravel()
    for ax, (name, series, log) in zip(axes, PANELS):
        drawn = False
        for key, label in series:
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="." if len(points) < 50 else None, label=label)
                drawn = True
                if log and min(values) <= 0:
                    log = False
        if log and drawn:
            ax.set_yscale("log")
        else:
            ax.ticklabel_format(axis="y", useOffset=False)  # momentum 0.9996, not 1 - 0.0004
        for i, step in enumerate(resumes):
            ax.axvline(step, color="tab:red", linestyle="--", linewidth=1, label="resumed" if i == 0 else None)
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize="small")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    for ax in axes[3:]:
        ax.set_xlabel("step")
    if title:
        fig.suptitle(title)
    return fig


def write_plot(workdir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw workdir's metrics into ``out`` (default workdir/metrics.png); returns the path written."""
    workdir = Path(workdir)
    rows = _read_jsonl(workdir / METRICS_FILE)
    if not rows:
        raise UserError(
            f"{workdir / METRICS_FILE} has no rows yet (is {workdir} a training workdir, and has it "
            "logged its first step?)"
        )
    resumes = sorted({s["step"] for s in _read_jsonl(workdir / STARTS_FILE) if s["step"] > 0})
    last = rows[-1]
    total = f" of {last['step'] + round(last['eta_s'] / last['step_time_s'])}" if last.get("step_time_s") else ""
    fig = make_figure(rows, resumes, f"{workdir.resolve().name}: step {last['step']}{total}")
    out = Path(out) if out is not None else workdir / PLOT_FILE
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: name a .png file")
    return atomic_write(out, lambda tmp: fig.savefig(tmp, format="png"))
