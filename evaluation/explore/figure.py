"""The explorer's view as a PNG (`--png=IMAGE:ROW,COL`), drawn with matplotlib from the same embedded features,
colour map and nearest-patch rule as the page: one panel per image and model, images side by side in cards as
on the page (each model in its own column of a card), the query patch and each image's k nearest patches marked,
and the colour scale below."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from evaluation.explore.data import Explorer, check_query, nearest_patches, similarity_maps
from evaluation.explore.page import colormap_rgb

QUERY_COLOR, NEAREST_COLOR = "white", "#00e5ff"  # as explore.css
PANEL_INCHES = 2.3
OVERLAY_ALPHA = 0.7  # the page's default overlay opacity


def model_labels(count: int) -> list[str]:
    return [chr(ord("A") + i % 26) for i in range(count)]


def draw(explorer: Explorer, image: int, row: int, col: int, view: str = "sim"):
    """The matplotlib Figure of the view with query patch (row, col) of `image`; `view` is "sim" or "pca"."""
    from matplotlib.cm import ScalarMappable  # a slow import: only when a figure is drawn
    from matplotlib.colors import ListedColormap, Normalize
    from matplotlib.figure import Figure

    check_query(len(explorer.images), explorer.grid, image, row, col)
    n, models = len(explorer.images), explorer.models
    sims = [similarity_maps(m.unit_vectors(), image, row, col, explorer.grid) for m in models]
    lo, hi = min(float(s.min()) for s in sims), max(float(s.max()) for s in sims)
    colors = ListedColormap(colormap_rgb() / 255.0), Normalize(vmin=min(lo, hi - 1e-6), vmax=hi)

    cards = max(1, math.ceil(math.sqrt(n / len(models))))  # cards per row: a roughly square sheet
    rows = math.ceil(n / cards)
    fig = Figure(figsize=(PANEL_INCHES * cards * len(models), PANEL_INCHES * rows + 1.4), dpi=100, layout="constrained")
    sheet, foot = fig.subfigures(2, 1, height_ratios=[PANEL_INCHES * rows, 0.7])
    grid = sheet.subfigures(rows, cards, squeeze=False, wspace=0.03, hspace=0.03)
    for sub in grid.ravel()[n:]:
        sub.set_visible(False)
    for i in range(n):
        _card(grid[i // cards, i % cards], explorer, i, [s[i] for s in sims], (image, row, col), view, colors)
    names = "; ".join(f"{label} = {m.name}" for label, m in zip(model_labels(len(models)), models))
    fig.suptitle(
        f"query: image {image} ({explorer.images[image].name}), patch row {row}, column {col}\n{names}", fontsize=9
    )
    if view == "pca":
        foot.text(
            0.5, 0.5, "PCA-RGB: each model's first three principal components as R, G, B", ha="center", fontsize=8
        )
    else:
        bar = foot.colorbar(
            ScalarMappable(norm=colors[1], cmap=colors[0]),
            cax=foot.add_axes((0.25, 0.55, 0.5, 0.18)),
            orientation="horizontal",
        )
        bar.ax.tick_params(labelsize=7)
        bar.set_label(
            f"cosine similarity to the query patch (white square); cyan: each image's {explorer.top_k} nearest patches",
            fontsize=8,
        )
    return fig


def _card(card, explorer: Explorer, i: int, sims: list[np.ndarray], query, view: str, colors) -> None:
    """One image's card: a panel per model, the overlay, the nearest patches and, on the query image, the query."""
    from matplotlib.patches import Rectangle  # matplotlib: only when a figure is drawn

    image, row, col = query
    h, w = explorer.grid
    shown = explorer.images[i]
    card.set_facecolor("#eeeeec" if i == image else "white")
    card.suptitle(f"{i}: {shown.name}", fontsize=8, fontweight="bold" if i == image else "normal")
    jpeg, width, height = shown.display_jpeg(explorer.size)
    pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    panels = card.subplots(1, len(explorer.models), squeeze=False)[0]
    for ax, label, model, sim in zip(panels, model_labels(len(explorer.models)), explorer.models, sims):
        ax.set_axis_off()
        ax.set_title(label, fontsize=8, loc="left")
        extent = (0, w, h, 0)  # one unit per patch; the aspect below stretches the grid over the photo
        ax.imshow(pixels, extent=extent, interpolation="bilinear")
        if view == "pca":
            ax.imshow(model.pca_rgb[i], extent=extent, alpha=OVERLAY_ALPHA, interpolation="nearest")
        else:
            ax.imshow(sim, extent=extent, cmap=colors[0], norm=colors[1], alpha=OVERLAY_ALPHA, interpolation="nearest")
        ax.set_aspect((height / h) / (width / w))
        for p in nearest_patches(sim, explorer.top_k, row * w + col if i == image else None):
            ax.add_patch(Rectangle((p % w, p // w), 1, 1, fill=False, edgecolor=NEAREST_COLOR, linewidth=1.2))
        if i == image:
            for color, lw in (("black", 3.0), (QUERY_COLOR, 1.5)):
                ax.add_patch(Rectangle((col, row), 1, 1, fill=False, edgecolor=color, linewidth=lw))
