"""PNG panels for a person to look at: image | ground truth | predictions, and the colourings they use (the VOC
palette for class labels, a fixed colour per cluster id, a PCA colouring of features). Drawn by `evaluation.plots`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from evaluation.pca import fit_pca
from evaluation.plots import panel_row_figure, save_figure


def class_palette() -> np.ndarray:
    """(256, 3) uint8: the Pascal VOC colour map (bit-interleaved class index; 255 is VOC's cream void)."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def cluster_colors(ids: np.ndarray, seed: int = 0) -> np.ndarray:
    """RGB uint8 for arbitrary non-negative cluster ids (a fixed random colour per id)."""
    table = np.random.default_rng(seed).integers(30, 256, size=(int(ids.max(initial=0)) + 1, 3)).astype(np.uint8)
    return table[ids]


def label_colors(labels: np.ndarray) -> np.ndarray:
    """RGB uint8 of a class label map (values 0..255) with the VOC palette."""
    return class_palette()[np.asarray(labels, dtype=np.uint8)]


def pca_rgb(features: np.ndarray) -> np.ndarray:
    """(n, h, w, D) features -> (n, h, w, 3) uint8: the first three principal components (fitted on all of
    them), each stretched from its 1st to 99th percentile."""
    n, h, w, d = features.shape
    flat = features.reshape(-1, d).astype(np.float32)
    proj = np.asarray(fit_pca(flat, min(3, d))(flat))
    if proj.shape[1] < 3:
        proj = np.pad(proj, ((0, 0), (0, 3 - proj.shape[1])))
    lo, hi = np.percentile(proj, 1, axis=0), np.percentile(proj, 99, axis=0)
    rgb = np.clip((proj - lo) / np.maximum(hi - lo, 1e-8), 0, 1)
    return (rgb * 255).round().astype(np.uint8).reshape(n, h, w, 3)


def save_panel_row(arrays: Sequence[np.ndarray], path: Path, titles: Sequence[str] | None = None) -> Path:
    """One PNG with the arrays side by side at the first one's size: RGB arrays as they are, 2-D arrays as class
    labels in the VOC palette (use `cluster_colors` first for raw cluster ids)."""
    images = [label_colors(a) if a.ndim == 2 else np.asarray(a, dtype=np.uint8) for a in arrays]
    return save_figure(panel_row_figure(images, titles), path)


def save_segmentation_panels(
    examples: Sequence[Sequence[np.ndarray]],
    folder: Path,
    *,
    num_classes: int,
    titles: Sequence[str] | None = None,
) -> list[Path]:
    """`folder/example_<i>.png` for each example (image, ground truth, prediction, ...extra panels).

    `num_classes` only sets the default titles' wording; label maps are coloured with the VOC palette.
    """
    folder = Path(folder)
    paths = []
    for i, arrays in enumerate(examples):
        names = list(titles or ["image", "ground truth", f"prediction ({num_classes} classes)"])
        names = (names + [""] * len(arrays))[: len(arrays)]
        paths.append(save_panel_row(list(arrays), folder / f"example_{i:03d}.png", names))
    return paths
