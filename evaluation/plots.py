"""Charts as PNG without a plotting library (PIL only): the CD search history and the suite's bar chart."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

_MARGIN = (56, 28, 16, 64)  # left, top, right, bottom
_BLUE, _ORANGE, _GREY, _RED = (31, 119, 180), (255, 127, 14), (150, 150, 150), (200, 40, 40)


class _Axes:
    """A plot area mapping data (x, y) to pixels, y from `y_lo` to `y_hi`, with a title and y tick labels."""

    def __init__(self, size, x_range, y_range, title: str, y_label: str):
        self.image = Image.new("RGB", size, (255, 255, 255))
        self.draw = ImageDraw.Draw(self.image)
        left, top, right, bottom = _MARGIN
        self.box = (left, top, size[0] - right, size[1] - bottom)
        self.x_range, self.y_range = x_range, y_range
        self.draw.rectangle(self.box, outline=(0, 0, 0))
        self.draw.text((left, 6), title, fill=(0, 0, 0))
        self.draw.text((4, top - 14), y_label, fill=(0, 0, 0))
        lo, hi = y_range
        for i in range(5):
            value = lo + (hi - lo) * i / 4
            _, y = self.xy(x_range[0], value)
            self.draw.line((left - 4, y, left, y), fill=(0, 0, 0))
            self.draw.line((left + 1, y, self.box[2] - 1, y), fill=(235, 235, 235))
            self.draw.text((4, y - 6), f"{value:.3g}", fill=(0, 0, 0))

    def xy(self, x: float, y: float) -> tuple[float, float]:
        (x0, x1), (y0, y1) = self.x_range, self.y_range
        left, top, right, bottom = self.box
        fx = (x - x0) / (x1 - x0) if x1 > x0 else 0.5
        fy = (y - y0) / (y1 - y0) if y1 > y0 else 0.5
        return left + fx * (right - left), bottom - fy * (bottom - top)

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.image.save(path)
        return path


def _value_range(values: Sequence[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = 0.05 * (hi - lo) or 0.05
    return lo - pad, hi + pad


def save_search_history(search: dict, path: Path) -> Path:
    """Objective of every trial (dots; dropped trials as red ticks on the x axis) and the best so far (line)."""
    rows = search["trials"]
    done = [(r["trial"], r["value"]) for r in rows if r["value"] is not None]
    ax = _Axes(
        (720, 400),
        (0, max(len(rows) - 1, 1)),
        _value_range([v for _, v in done]),
        f"CD hyper-parameter search: {len(done)} of {len(rows)} trials completed; best "
        f"{search['best_value']:.4f} at {search['best']}",
        "train mIoU",
    )
    best, line = None, []
    for trial, value in done:
        best = value if best is None else max(best, value)
        line.append(ax.xy(trial, best))
        x, y = ax.xy(trial, value)
        ax.draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=_BLUE)
    if len(line) > 1:
        ax.draw.line(line, fill=_ORANGE, width=2)
    for r in rows:
        if r["value"] is None:
            x, _ = ax.xy(r["trial"], 0)
            ax.draw.line((x, ax.box[3] - 6, x, ax.box[3]), fill=_RED)
    legend = "trial  (dots: trials, line: best so far, red ticks: dropped)"
    ax.draw.text((ax.box[0], ax.box[3] + 8), legend, fill=(0, 0, 0))
    return ax.save(path)


def save_bar_chart(groups: Sequence[str], series: dict[str, Sequence[float | None]], path: Path, title: str) -> Path:
    """Grouped bars: one group per label in `groups`, one bar per series (None leaves a gap), values in percent."""
    names = list(series)
    values = [v for vs in series.values() for v in vs if v is not None]
    ax = _Axes((max(480, 110 * len(groups) + 120), 420), (0, len(groups)), (0, max(100.0, *values)), title, "mIoU %")
    colours = [_BLUE, _ORANGE, _GREY, _RED]
    width = 0.8 / max(len(names), 1)
    for g, label in enumerate(groups):
        for s, name in enumerate(names):
            value = series[name][g]
            if value is None:
                continue
            x0, y0 = ax.xy(g + 0.1 + s * width, 0)
            x1, y1 = ax.xy(g + 0.1 + (s + 1) * width, value)
            ax.draw.rectangle((x0, y1, x1 - 2, y0), fill=colours[s % len(colours)])
            ax.draw.text((x0, y1 - 12), f"{value:.1f}", fill=(0, 0, 0))
        x, _ = ax.xy(g + 0.1, 0)
        ax.draw.text((x, ax.box[3] + 6), label, fill=(0, 0, 0))
    for s, name in enumerate(names):
        y = ax.box[3] + 34 + 12 * s
        ax.draw.rectangle((ax.box[0], y, ax.box[0] + 10, y + 8), fill=colours[s % len(colours)])
        ax.draw.text((ax.box[0] + 16, y - 2), name, fill=(0, 0, 0))
    return ax.save(path)
