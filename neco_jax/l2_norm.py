"""L2 normalisation of vectors, ``torch.nn.functional.normalize(x, dim=-1)``, for every caller.

The projection head's output, the loss's cosine similarities, spherical k-means centroids and the retrieval
memory's keys all use this one function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# F.normalize's eps: x / max(||x||, eps), so an all-zero vector stays zero instead of becoming NaN.
NORMALIZE_EPS = 1e-12


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = NORMALIZE_EPS) -> jax.Array:
    """x / max(||x||, eps) along ``axis``, with a finite (zero) gradient at x = 0, e.g. never-written queue slots.

    The square root of a zero sum would give an infinite gradient; the zero vectors' norm is therefore taken
    as 0 without differentiating the root there (the value is the same).
    """
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    norm = jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)
    return x / jnp.maximum(norm, eps)
