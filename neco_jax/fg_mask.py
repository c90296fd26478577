"""Foreground masks from CLS attention: NeCo's fg/bg loss ablation and the CBFE evaluation's noisy foreground.

The original (``process_attentions``, adapted from DINO's attention visualisation) averages the heads of
the last block's CLS->patch attention, blurs it with torchvision's ``GaussianBlur(7, sigma=0.6)``
(reflect padding), keeps the patches holding the top 60% of the attention mass and removes 8-connected
components of at most 2 patches (``process_attentions`` in ``experiments/utils.py`` of ``vpariza/NeCo``, taken from Leopart). Here every
step is a static-shape array program, so it runs inside the jitted train step; ``evaluation.cbfe`` runs the
same function on the evaluated model's attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    """torchvision's 1-D kernel: exp(-x^2 / (2 sigma^2)) on linspace(-(size-1)/2, (size-1)/2), normalised."""
    x = np.linspace(-(size - 1) / 2, (size - 1) / 2, size)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def gaussian_blur(maps: jax.Array, size: int, sigma: float) -> jax.Array:
    """Separable Gaussian blur of (B, h, w) with reflect padding, as torchvision's tensor GaussianBlur."""
    kernel = _gaussian_kernel(size, sigma)
    half = size // 2
    height, width = maps.shape[1:]
    padded = jnp.pad(maps, ((0, 0), (half, half), (half, half)), mode="reflect")
    rows = sum(kernel[i] * padded[:, i : i + height, :] for i in range(size))
    return sum(kernel[i] * rows[:, :, i : i + width] for i in range(size))


def _component_sizes(mask: jax.Array) -> jax.Array:
    """(B, h, w) int: size of each pixel's 8-connected foreground component (0 on background)."""
    batch, height, width = mask.shape
    ids = jnp.arange(1, height * width + 1, dtype=jnp.int32).reshape(1, height, width)
    labels = jnp.where(mask, ids, 0)

    def spread(labels):
        padded = jnp.pad(labels, ((0, 0), (1, 1), (1, 1)))
        neighbours = [padded[:, dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)]
        return jnp.where(mask, jnp.max(jnp.stack(neighbours), axis=0), 0)

    def not_done(carry):
        old, new = carry
        return jnp.any(old != new)

    _, labels = jax.lax.while_loop(not_done, lambda c: (c[1], spread(c[1])), (labels, spread(labels)))
    flat = labels.reshape(batch, -1)
    same = (flat[:, :, None] == flat[:, None, :]) & (flat[:, :, None] > 0)
    return same.sum(axis=2).reshape(batch, height, width)


def attention_fg_mask(
    attn_cls: jax.Array,
    grid: tuple[int, int],
    *,
    threshold: float = 0.6,
    blur_size: int = 7,
    blur_sigma: float = 0.6,
    min_component: int = 3,
) -> jax.Array:
    """Binary foreground mask (..., h, w) float32 from CLS attention.

    Args:
      attn_cls: (..., heads, h*w) CLS->patch attention of the last block (the model's ``attn_cls``), e.g.
        (B, heads, N) or (B, G, heads, N) for the G global crops of a batch.
      grid: (h, w) patch grid.
      threshold: fraction of the (blurred) attention mass kept as foreground (0.6 in NeCo's training).
      blur_size, blur_sigma: torchvision GaussianBlur kernel size and sigma.
      min_component: components smaller than this many patches are removed (the original drops <= 2).
    """
    height, width = grid
    attn_cls = jnp.asarray(attn_cls, jnp.float32)
    lead = attn_cls.shape[:-2]
    attn = jnp.mean(attn_cls, axis=-2).reshape(-1, height, width)
    attn = gaussian_blur(attn, blur_size, blur_sigma).reshape(attn.shape[0], -1)
    order = jnp.argsort(attn, axis=1)
    values = jnp.take_along_axis(attn, order, axis=1)
    cumulative = jnp.cumsum(values / jnp.sum(values, axis=1, keepdims=True), axis=1)
    keep_sorted = cumulative > 1.0 - threshold
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(attn.shape[0])[:, None], order].set(keep_sorted)
    keep = keep.reshape(-1, height, width)
    keep = keep & (_component_sizes(keep) >= min_component)
    return keep.astype(jnp.float32).reshape(*lead, height, width)
