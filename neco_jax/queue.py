"""FIFO queues of teacher patch vectors, NeCo's reference patches, as explicit train-state arrays.

One queue per anchor (global) crop, zero-initialised. Each step, before the loss, ``push`` shifts every
queue and writes min(10 * B, length) teacher vectors drawn without replacement from that crop's
B * h * w grid at the front; ``sample`` then draws ``randperm(length)[:count] mod filled``, so the queue
is usable from the first step.

The original keeps one fill counter for all queues and increments it once per queue, so it grows by
2 * 10 * B per step and indexes never-written zero slots during the first steps (`update_queue` and `knn_loss`
in vpariza/NeCo src/neco.py).
``original_counter=True`` reproduces that; the default counts each queue's real entries.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from neco_jax.errors import ConfigError


class QueueState(NamedTuple):
    """vectors: (A, length, D) float32, newest first; filled: (A,) int32, the count that sampling wraps at."""

    vectors: jax.Array
    filled: jax.Array


def init(num_anchors: int, length: int, dim: int) -> QueueState:
    """Zero queues, as the original (``torch.zeros(len(crops_for_assign), queue_length // gpus, dim)``)."""
    if length <= 0:
        raise ConfigError(f"queue length must be positive, got {length}; set queue_length > 0 or disable the queue")
    return QueueState(jnp.zeros((num_anchors, length, dim), jnp.float32), jnp.zeros((num_anchors,), jnp.int32))


def push(
    state: QueueState,
    teacher: jax.Array,
    key: jax.Array,
    *,
    per_image: int = 10,
    valid: jax.Array | None = None,
    original_counter: bool = False,
) -> QueueState:
    """Push min(per_image * B, length) random teacher vectors of each anchor crop at the queue fronts.

    Args:
      state: the queues.
      teacher: (B, A, h, w, D) teacher head vectors of the A anchor crops (constants: gradients are stopped).
      key: PRNG key; the draw is without replacement over the B * h * w vectors of each crop.
      per_image: vectors per image per step (10 in NeCo).
      valid: optional (B, A, h, w) bool, only these vectors may be pushed (the fg/bg ablation's queue holds
        only masked vectors). With fewer valid vectors than the push size only those are pushed, and the
        queue shifts by that many (the original would fail on the shape mismatch).
      original_counter: reproduce the original's shared counter that grows by A * push size per step.
    """
    batch, anchors = teacher.shape[:2]
    dim = teacher.shape[-1]
    length = state.vectors.shape[1]
    size = min(per_image * batch, length)
    flat = jax.lax.stop_gradient(jnp.asarray(teacher, jnp.float32))
    flat = jnp.moveaxis(flat, 1, 0).reshape(anchors, -1, dim)  # (A, B*h*w, D), image-major
    if valid is None:
        valid = jnp.ones(flat.shape[:2], bool)
    else:
        valid = jnp.moveaxis(jnp.asarray(valid, bool), 1, 0).reshape(anchors, -1)
    # A uniformly random order of the valid vectors: random priorities, invalid ones last.
    priority = jax.random.uniform(key, valid.shape)
    order = jnp.argsort(jnp.where(valid, -priority, 1.0), axis=1)[:, :size]
    fresh = jnp.take_along_axis(flat, order[..., None], axis=1)  # (A, size, D)
    pushed = jnp.minimum(valid.sum(axis=1), size).astype(jnp.int32)  # (A,)

    slots = jnp.arange(length)
    take_fresh = slots[None, :] < pushed[:, None]
    old = jnp.take_along_axis(state.vectors, jnp.clip(slots[None, :] - pushed[:, None], 0)[..., None], axis=1)
    new = jnp.take_along_axis(fresh, jnp.clip(slots, 0, size - 1)[None, :, None], axis=1)
    vectors = jnp.where(take_fresh[..., None], new, old)
    if original_counter:
        filled = jnp.minimum(state.filled + anchors * size, length)
    else:
        filled = jnp.minimum(state.filled + pushed, length)
    return QueueState(vectors, filled.astype(jnp.int32))


def sample(state: QueueState, anchor: int, count: int, key: jax.Array) -> jax.Array:
    """(count, D) references of one anchor's queue: ``randperm(length)[:count] mod filled`` as the original.

    A queue with nothing filled yet (only possible with a fully empty masked push) wraps at 1 and yields
    its zero slot.
    """
    length = state.vectors.shape[1]
    if count > length:
        raise ConfigError(
            f"a pair needs {count} reference vectors but the queue holds {length}; "
            "use queue_length >= batch_size * output_size**2"
        )
    index = jax.random.permutation(key, length)[:count] % jnp.maximum(state.filled[anchor], 1)
    return state.vectors[anchor, index]
