"""Pictures of the evaluation as PNG, drawn with matplotlib (as the training curves, `neco_jax/curves.py`): the CD
search history, the suite's bar chart, and rows of image panels (image | ground truth | prediction ...).

Each picture is a matplotlib `Figure` built without pyplot (no global state, safe in any thread) by a function
that returns it, so that tests read what was drawn from the figure; `save_*` writes it, atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from neco_jax.files import atomic_write

DPI = 100


def new_figure(width_px: float, height_px: float):
    """An empty matplotlib Figure of about `width_px` x `height_px` pixels when saved."""
    from matplotlib.figure import Figure  # a slow import: only when a picture is drawn

    return Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, layout="constrained")


def save_figure(fig, path: str | Path) -> Path:
    """`fig` as a PNG at `path` (folders created), whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def search_history_figure(search: dict):
    """Objective of every trial (dots; dropped trials as red ticks on the x axis) and the best so far (line)."""
    rows = search["trials"]
    done = [(r["trial"], r["value"]) for r in rows if r["value"] is not None]
    fig = new_figure(720, 400)
    ax = fig.subplots()
    if done:
        trials, values = zip(*done)
        ax.plot(trials, values, "o", markersize=4, label="trial")
        ax.plot(trials, np.maximum.accumulate(values), "-", linewidth=2, label="best so far")
    dropped = [r["trial"] for r in rows if r["value"] is None]
    if dropped:
        at_bottom = ax.get_xaxis_transform()  # x in data, y in axes units: 0 is the x axis
        ax.plot(dropped, [0] * len(dropped), "|", color="tab:red", markersize=12, label="dropped", transform=at_bottom)
    ax.set_title(
        f"CD hyper-parameter search: {len(done)} of {len(rows)} trials completed; best "
        f"{search['best_value']:.4f} at {search['best']}",
        fontsize="medium",
    )
    ax.set_xlabel("trial")
    ax.set_ylabel("train mIoU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def save_search_history(search: dict, path: Path) -> Path:
    return save_figure(search_history_figure(search), path)


def bar_chart_figure(groups: Sequence[str], series: dict[str, Sequence[float | None]], title: str):
    """Grouped bars: one group per label in `groups`, one bar per series (None leaves a gap), values in percent,
    each bar labelled with its value."""
    fig = new_figure(max(480, 110 * len(groups) + 120), 420)
    ax = fig.subplots()
    width = 0.8 / max(len(series), 1)
    for s, (name, values) in enumerate(series.items()):
        shown = [(g, v) for g, v in enumerate(values) if v is not None]
        if not shown:
            continue
        at, heights = zip(*shown)
        bars = ax.bar([g - 0.4 + (s + 0.5) * width for g in at], heights, width * 0.95, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize="small")
    ax.set_xticks(range(len(groups)), groups, fontsize="small")
    ax.set_ylim(0, max(100.0, *(v for vs in series.values() for v in vs if v is not None)) * 1.05)
    ax.set_ylabel("mIoU %")
    ax.set_title(title, fontsize="medium")
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize="small")
    return fig


def save_bar_chart(groups: Sequence[str], series: dict[str, Sequence[float | None]], path: Path, title: str) -> Path:
    return save_figure(bar_chart_figure(groups, series, title), path)


def panel_row_figure(images: Sequence[np.ndarray], titles: Sequence[str] | None = None):
    """RGB uint8 images side by side, each shown pixel for pixel (nearest neighbour) at the first one's size, at
    least 160 pixels wide, with its title above."""
    h, w = images[0].shape[:2]
    scale = max(1.0, 160 / w)
    fig = new_figure(len(images) * w * scale, h * scale + (24 if titles else 0))
    fig.get_layout_engine().set(w_pad=0.02, h_pad=0.02, wspace=0.01)
    for ax, image, title in zip(fig.subplots(1, len(images), squeeze=False)[0], images, titles or [""] * len(images)):
        ax.imshow(image, interpolation="nearest", extent=(0, w, h, 0))
        ax.set_title(title, fontsize="small")
        ax.set_axis_off()
    return fig
