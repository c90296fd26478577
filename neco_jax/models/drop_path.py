"""Stochastic depth exactly as DINOv2 / NeCo apply it (`dinov2/layers/block.py`, `drop_path.py`).

The per-block rates come from `torch.linspace(0, rate, depth)` in float32. A block whose rate is in (0, 0.1]
uses per-sample drop path; a block whose rate is above 0.1 uses DINOv2's batch-subset variant. Because the
schedule is float32, the last block's rate float32(0.1) = 0.10000000149 is above 0.1, so with NeCo's
drop_path_rate=0.1 exactly the last block takes the batch-subset path. DINO-architecture blocks (NeCo's
`src/models/vit.py`, `ViTConfig.drop_path_mode="per_sample"`) use per-sample drop path at every rate.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

# DINOv2's Block switches to the batch-subset variant strictly above this rate.
BATCH_SUBSET_THRESHOLD = 0.1


def drop_path_schedule(rate: float, depth: int) -> tuple[float, ...]:
    """The per-block rates `[x.item() for x in torch.linspace(0, rate, depth)]` (float32 arithmetic).

    torch fills the first half as start + step * i and the second half backwards as end - step * (depth-1-i),
    each a fused multiply-add (one float32 rounding, emulated here in float64), so the last rate is exactly `rate`.
    """
    if depth == 1:
        return (0.0,)
    start, end = np.float32(0.0), np.float32(rate)
    step = np.float64((end - start) / np.float32(depth - 1))
    halfway = depth // 2
    rates = [
        np.float64(start) + step * i if i < halfway else np.float64(end) - step * (depth - 1 - i) for i in range(depth)
    ]
    return tuple(float(np.float32(r)) for r in rates)


def drop_path(residual: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Per-sample stochastic depth: keep each sample's residual with p = 1 - rate, scaled by 1 / (1 - rate)."""
    keep = 1.0 - rate
    shape = (residual.shape[0],) + (1,) * (residual.ndim - 1)
    mask = jax.random.bernoulli(key, keep, shape).astype(residual.dtype)
    return residual * (mask / jnp.asarray(keep, residual.dtype))


def add_residual_on_subset(
    x: jax.Array, residual_fn: Callable[[jax.Array], jax.Array], rate: float, key: jax.Array
) -> jax.Array:
    """DINOv2's `drop_add_residual_stochastic_depth`: only a random subset of max(int(b (1 - rate)), 1) samples
    is passed through `residual_fn`, and their residual is added scaled by b / subset; the rest get none."""
    b = x.shape[0]
    subset = max(int(b * (1 - rate)), 1)
    index = jax.random.permutation(key, b)[:subset]
    residual = residual_fn(x[index]).astype(x.dtype)
    return x.at[index].add(residual * jnp.asarray(b / subset, x.dtype))
