"""Position-table resampling that reproduces PyTorch's bicubic `F.interpolate` bit for bit (up to fp32 rounding).

DINOv2, DINO and NeCo resize their learned G x G table with
`F.interpolate(table, scale_factor=((h + offset) / G, (w + offset) / G), mode="bicubic", align_corners=False)`,
and the hub's register models with `size=(h, w), antialias=True`. `jax.image.resize` uses another cubic kernel
(a = -0.5) and antialiases by default, so it gives visibly different embeddings. Here the two separable 1-D
resampling matrices are built in NumPy with torch's own arithmetic (float32, same index and weight rules), then
applied with one einsum. They depend only on static shapes, so they are trace-time constants.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

_F32 = np.float32


def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys cubic-convolution kernel at distances `x` (evaluated in float64, rounded once to float32)."""
    x = np.abs(x.astype(np.float64))
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0)).astype(_F32)


def _pixel_scale(in_size: int, out_size: int, scale_factor: float | None) -> np.float32:
    """torch's `area_pixel_compute_scale` (align_corners=False): 1/scale_factor when given, else in/out."""
    if scale_factor is not None and scale_factor > 0:
        return _F32(1.0 / scale_factor)
    return _F32(in_size / out_size)


def _bicubic_matrix(in_size: int, out_size: int, scale_factor: float | None) -> np.ndarray:
    """(out, in) matrix of torch's non-antialiased bicubic: a = -0.75, 4 taps clamped to the border."""
    scale = _pixel_scale(in_size, out_size, scale_factor)
    # src = scale * (dst + 0.5) - 0.5 in float32; torch's compiled kernel fuses the multiply-add (one rounding).
    src = (np.float64(scale) * (np.arange(out_size) + 0.5) - 0.5).astype(_F32)
    # torch's guard_index_and_lambda: index clamped to in-1, fraction clamped to [0, 1].
    index = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    frac = np.clip(src - index.astype(_F32), 0, 1).astype(_F32)
    rows = np.arange(out_size)
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    for tap, dist in enumerate((frac + 1, frac, 1 - frac, 2 - frac)):
        cols = np.clip(index - 1 + tap, 0, in_size - 1)
        np.add.at(matrix, (rows, cols), _keys_cubic(dist, -0.75))
    return matrix.astype(_F32)


def _bicubic_aa_matrix(in_size: int, out_size: int, scale_factor: float | None) -> np.ndarray:
    """(out, in) matrix of torch's antialiased bicubic (PIL-style: a = -0.5, widened support, normalised taps)."""
    if in_size == out_size:  # torch's separable antialiased kernel skips axes whose size does not change
        return np.eye(in_size, dtype=_F32)
    scale = _pixel_scale(in_size, out_size, scale_factor)
    support = _F32(2.0) * scale if scale >= 1.0 else _F32(2.0)
    invscale = np.float64(_F32(1.0 / scale)) if scale >= 1.0 else 1.0
    matrix = np.zeros((out_size, in_size), dtype=_F32)
    for i in range(out_size):
        center = _F32(np.float64(scale) * (i + 0.5))
        lo = max(int(np.float64(center - support) + 0.5), 0)  # C++ static_cast truncates toward zero
        hi = min(int(np.float64(center + support) + 0.5), in_size)
        dist = ((np.arange(lo, hi).astype(_F32) - center).astype(np.float64) + 0.5) * invscale
        w = _keys_cubic(dist, -0.5)
        total = w.sum(dtype=_F32)
        matrix[i, lo:hi] = w / total if total != 0 else w
    return matrix


@functools.lru_cache(maxsize=256)
def resize_matrix(in_size: int, out_size: int, scale_factor: float | None, antialias: bool) -> np.ndarray:
    """The (out, in) float32 matrix equal to torch bicubic `F.interpolate` along one axis.

    `scale_factor` is the factor torch receives (None when an output size is given instead).
    """
    if antialias:
        return _bicubic_aa_matrix(in_size, out_size, scale_factor)
    return _bicubic_matrix(in_size, out_size, scale_factor)


def resample_grid(grid: jax.Array, out_hw: tuple[int, int], *, offset: float, antialias: bool) -> jax.Array:
    """Resize a (G, G, D) table to (h, w, D) exactly as DINOv2's `interpolate_pos_encoding` does.

    offset > 0: `scale_factor=((h + offset) / G, (w + offset) / G)` (DINOv2, DINO, NeCo; offset 0.1).
    offset == 0: `size=(h, w)` (the hub's register models, used with antialias=True).
    """
    g_h, g_w = grid.shape[0], grid.shape[1]
    h, w = out_hw
    if offset:
        sf_h, sf_w = (h + offset) / g_h, (w + offset) / g_w
        if math.floor(g_h * sf_h) != h or math.floor(g_w * sf_w) != w:
            raise ValueError(f"offset {offset} does not give a {h}x{w} grid from {g_h}x{g_w}")
    else:
        sf_h = sf_w = None
    m_h = jnp.asarray(resize_matrix(g_h, h, sf_h, antialias))
    m_w = jnp.asarray(resize_matrix(g_w, w, sf_w, antialias))
    grid = grid.astype(jnp.float32)
    return jnp.einsum("hi,ijd,wj->hwd", m_h, grid, m_w, precision=jax.lax.Precision.HIGHEST)


def interpolate_pos_embed(
    pos_embed: jax.Array,
    grid_hw: tuple[int, int],
    image_hw: tuple[int, int],
    *,
    offset: float,
    antialias: bool,
) -> jax.Array:
    """Position embeddings (1, 1 + h*w, D) for an image of `image_hw` pixels cut into a `grid_hw` patch grid.

    `pos_embed` is the stored (1, 1 + G*G, D) table, CLS entry first. As in DINOv2 (and DINO), the table is used
    unchanged only when the grid is G x G *and* the image is square in pixels; every other input resamples it.
    """
    num = pos_embed.shape[1] - 1
    g = math.isqrt(num)
    if g * g != num:
        raise ValueError(f"pos_embed holds {num} patch positions, not a square grid")
    if tuple(grid_hw) == (g, g) and image_hw[0] == image_hw[1]:
        return pos_embed
    dim = pos_embed.shape[-1]
    table = pos_embed[0, 1:].reshape(g, g, dim)
    patches = resample_grid(table, grid_hw, offset=offset, antialias=antialias)
    patches = patches.reshape(1, grid_hw[0] * grid_hw[1], dim)
    cls = pos_embed[:, :1].astype(jnp.float32)
    return jnp.concatenate([cls, patches], axis=1).astype(pos_embed.dtype)
