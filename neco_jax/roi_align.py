"""Bilinear ROI-align equal to torchvision ``roi_align(spatial_scale=1, sampling_ratio=-1, aligned=True)``.

NeCo resamples the teacher and student feature maps of two overlapping crops onto the same k x k grid
of physical locations; this alignment is what makes the two patch sets correspond.

torchvision's rule per box (coordinates shifted by -0.5, no minimum size): the box is cut into k x k
equal bins; bin (i, j) averages a ceil(h/k) x ceil(w/k) grid of bilinear samples at sub-bin centres
(count clamped to at least 1, so empty or inverted boxes give 0). A sample with y < -1 or y > H (same
for x) contributes 0, else y is clamped into [0, H-1] before interpolating.

Every factor of that rule separates into a y part and an x part, so a box is two small matrices
Wy (k, H) and Wx (k, W) and the output is Wy F Wx^T: two matmuls instead of k*k*gh*gw gathers. The
adaptive sample count becomes a static upper bound with masked samples.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _axis_weights(start: jax.Array, end: jax.Array, size: int, output_size: int, max_grid: int) -> jax.Array:
    """(N, k, size) interpolation weights along one axis for N boxes, divided by that axis' sample count."""
    start = start - 0.5
    length = end - 0.5 - start
    bin_size = length / output_size
    grid = jnp.ceil(length / output_size)  # samples per bin along this axis; <= 0 for empty boxes
    grid_safe = jnp.maximum(grid, 1.0)
    ph = jnp.arange(output_size, dtype=jnp.float32)[None, :, None]
    iy = jnp.arange(max_grid, dtype=jnp.float32)[None, None, :]
    start, bin_size, grid, grid_safe = (v[:, None, None] for v in (start, bin_size, grid, grid_safe))
    y = start + ph * bin_size + (iy + 0.5) * bin_size / grid_safe  # (B, k, G)
    used = (iy < grid) & (y >= -1.0) & (y <= size)
    y = jnp.clip(y, 0.0, None)
    low = jnp.floor(y)
    at_edge = low >= size - 1
    low = jnp.where(at_edge, size - 1, low)
    y = jnp.where(at_edge, low, y)
    frac = y - low
    high = jnp.where(at_edge, low, low + 1)
    cells = jnp.arange(size, dtype=jnp.float32)
    weights = (1.0 - frac)[..., None] * (cells == low[..., None]) + frac[..., None] * (cells == high[..., None])
    weights = jnp.where(used[..., None], weights, 0.0).sum(axis=2)
    return weights / grid_safe


def roi_align(features: jax.Array, boxes: jax.Array, output_size: int = 7, *, max_grid: int | None = None) -> jax.Array:
    """ROI-align boxes on their feature maps.

    Args:
      features: (B, H, W, D) feature maps.
      boxes: (B, 4) or (B, K, 4) boxes (x1, y1, x2, y2) in feature-map units (pixels / patch size);
        with K, each map is aligned to its K boxes.
      output_size: k, the output grid is k x k.
      max_grid: static upper bound on the samples per bin along an axis (torchvision uses ceil(box/k));
        default ceil((max(H, W) + 2) / k), enough for any box reaching at most one cell past the map.

    Returns:
      (B, k, k, D), or (B, K, k, k, D), float32; differentiable with respect to the features.
    """
    features = jnp.asarray(features, jnp.float32)
    boxes = jax.lax.stop_gradient(jnp.asarray(boxes, jnp.float32))
    batch, height, width, _ = features.shape
    single = boxes.ndim == 2
    boxes = boxes.reshape(batch, -1, 4)
    num = boxes.shape[1]
    if max_grid is None:
        max_grid = max(1, math.ceil((max(height, width) + 2) / output_size))
    flat = boxes.reshape(-1, 4)
    wy = _axis_weights(flat[:, 1], flat[:, 3], height, output_size, max_grid)
    wx = _axis_weights(flat[:, 0], flat[:, 2], width, output_size, max_grid)
    wy = wy.reshape(batch, num, output_size, height)
    wx = wx.reshape(batch, num, output_size, width)
    hp = jax.lax.Precision.HIGHEST
    rows = jnp.einsum("bkih,bhwd->bkiwd", wy, features, precision=hp)
    out = jnp.einsum("bkjw,bkiwd->bkijd", wx, rows, precision=hp)
    return out[:, 0] if single else out
