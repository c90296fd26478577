"""Label transfer for dense NN retrieval: neighbours' soft labels, weighted by a softmax over cosines.

This is the Hummingbird "cross attention" readout: with query and neighbour keys both
L2-normalised (``knn.cosine_similarities``), the weights are ``softmax(cos(q, k_j) / temperature)``
over the k neighbours (temperature 0.02 in open-hummingbird-eval), and the prediction is the weighted mean of the
neighbours' C-dim label distributions. The patch-level prediction is upsampled bilinearly to the
network input size (align_corners=False, no antialias, as ``F.interpolate(mode="bilinear")``)
before the argmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def transfer_labels(cosines: jax.Array, neighbour_labels: jax.Array, *, temperature: float) -> jax.Array:
    """Soft labels (Q, C) from query-neighbour cosines (Q, k) and the neighbours' label distributions (Q, k, C)."""
    weights = jax.nn.softmax(cosines.astype(jnp.float32) / temperature, axis=-1)
    return jnp.einsum("qk,qkc->qc", weights, neighbour_labels.astype(jnp.float32))


def upsample_labels(soft: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear upsampling (B, S, S, C) -> (B, H, W, C), half-pixel centres, edges clamped.

    For upsampling, ``jax.image.resize`` with the linear kernel is exactly torch's
    ``F.interpolate(mode="bilinear", align_corners=False)``: antialiasing only acts when shrinking.
    """
    b, s_h, s_w, c = soft.shape
    if size[0] < s_h or size[1] < s_w:
        raise ValueError(f"upsample_labels only enlarges; got {soft.shape[1:3]} -> {size}")
    return jax.image.resize(soft, (b, size[0], size[1], c), method="bilinear", antialias=False)


def predict_segmentation(
    cosines: jax.Array,
    neighbour_labels: jax.Array,
    *,
    grid: tuple[int, int],
    size: tuple[int, int],
    temperature: float,
) -> jax.Array:
    """Per-pixel class ids (B, H, W) for B images whose B*h*w patch queries were searched (row-major)."""
    soft = transfer_labels(cosines, neighbour_labels, temperature=temperature)
    soft = soft.reshape(-1, grid[0], grid[1], soft.shape[-1])
    return jnp.argmax(upsample_labels(soft, size), axis=-1).astype(jnp.int32)
