"""The NeCo loss: make the student's soft ordering of reference patches match the teacher's.

For each anchor (global) crop g and every other crop v, both crops' head features are ROI-aligned onto
the 7x7 grid of their overlap. Each aligned patch ranks the same 49 reference vectors (FIFO queue of
teacher vectors, or a shuffled pool of the pair's aligned teacher features) by cosine similarity with a
differentiable sorting network; the loss is the cross-entropy between the teacher's and the student's
relaxed permutation matrices (sum over ranks, mean over image, query patch and reference), averaged over
the V - 1 crops of an anchor and over the anchors. Original: vpariza/NeCo src/neco.py (`knn_loss`); docs/method.md.

All pairs of a step go through one student sort and one teacher sort (stacked rows): one network in the
compiled step instead of twenty, and better-shaped kernels.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from neco_jax import queue as queue_lib
from neco_jax.errors import ConfigError
from neco_jax.l2_norm import l2_normalize
from neco_jax.roi_align import roi_align
from neco_jax.sorting import sort

SIMILARITIES = ("cosine", "euclidean")
LOSS_MASKS = ("all", "fg", "bg")
# log(P) is clamped here: the original has no epsilon and gives -inf/NaN where P underflows to 0.
LOG_FLOOR = float(np.finfo(np.float32).tiny)
# A ROI-aligned binary mask cell counts as masked-in at 1.0 (the original's ">= 1.0"); the slack absorbs
# the rounding of bilinear weights that sum to exactly 1 (torchvision itself drops ~0.2% of such cells).
MASK_ONE = 1.0 - 1e-6
HP = jax.lax.Precision.HIGHEST


def similarity_matrix(queries: jax.Array, references: jax.Array, similarity: str = "cosine") -> jax.Array:
    """(..., Q, D) x (..., R, D) -> (..., Q, R): cosine similarity, or Euclidean distance as ``torch.cdist``.

    Both are sorted ascending, as in the original (cosine: farthest reference first; euclidean: nearest).
    """
    queries = jnp.asarray(queries, jnp.float32)
    references = jnp.asarray(references, jnp.float32)
    if similarity == "cosine":
        return jnp.einsum("...qd,...rd->...qr", l2_normalize(queries), l2_normalize(references), precision=HP)
    if similarity == "euclidean":
        # cdist's matmul path: sqrt(clamp_min(|q|^2 + |r|^2 - 2 q.r, 1e-30)).
        sq = jnp.sum(queries**2, -1)[..., :, None] + jnp.sum(references**2, -1)[..., None, :]
        sq = sq - 2.0 * jnp.einsum("...qd,...rd->...qr", queries, references, precision=HP)
        return jnp.sqrt(jnp.maximum(sq, 1e-30))
    raise ConfigError(f"unknown similarity {similarity!r}; use one of {SIMILARITIES}")


def pair_loss(
    student: jax.Array,
    teacher: jax.Array,
    references: jax.Array,
    *,
    student_steepness: float = 100.0,
    teacher_steepness: float = 100.0,
    network: str = "bitonic",
    distribution: str = "cauchy",
    similarity: str = "cosine",
    query_mask: jax.Array | None = None,
) -> jax.Array:
    """The original's per-pair sub-loss ``-mean_{b,ref,q} sum_rank Q log P_s``, for one pair or stacked pairs.

    Args:
      student, teacher: (..., B, Q, D) ROI-aligned features of the student crop and the teacher anchor.
      references: (..., B, R, D), the same for both sides. Q (the teacher's matrix) is under stop_gradient;
        whether gradients reach the references is the caller's choice.
      query_mask: optional (..., B, Q) fg/bg mask: the mean is over masked-in queries only (0 if none).

    Returns:
      float32 (...): one loss per pair.
    """
    # The image axis B goes first: `sort` flattens all leading axes into rows, and with B the outermost of
    # them the rows stay split over the data-parallel devices. With stacked pairs in front, the partitioner
    # could not split the merged rows and every device sorted the whole batch.
    sim_s = jnp.moveaxis(similarity_matrix(student, references, similarity), -3, 0)
    sim_t = jnp.moveaxis(jax.lax.stop_gradient(similarity_matrix(teacher, references, similarity)), -3, 0)
    _, p_s = sort(sim_s, network=network, steepness=student_steepness, distribution=distribution)
    _, p_t = sort(sim_t, network=network, steepness=teacher_steepness, distribution=distribution)
    p_t = jax.lax.stop_gradient(p_t)
    ce = -jnp.sum(p_t * jnp.log(jnp.maximum(p_s, LOG_FLOOR)), axis=-1)  # (B, ..., Q, R): summed over ranks
    over = (0, -2, -1)
    if query_mask is None:
        return jnp.mean(ce, axis=over)
    weight = jnp.moveaxis(jnp.asarray(query_mask, jnp.float32), -2, 0)[..., None] * jnp.ones_like(ce)
    total = jnp.sum(weight, axis=over)
    return jnp.where(total > 0, jnp.sum(ce * weight, axis=over) / jnp.maximum(total, 1.0), 0.0)


def batch_pool(aligned: jax.Array, valid: jax.Array | None, key: jax.Array) -> jax.Array:
    """References from the pair's own aligned teacher features (no-queue mode), as the original.

    aligned (B, K, D); valid (B, K) or None. The valid vectors (in image-major order) are tiled up to B*K
    entries, randomly permuted and cut into B groups of K. With no valid vector the result is zeros.
    """
    batch, k, dim = aligned.shape
    flat = aligned.reshape(batch * k, dim)
    if valid is None:
        pool = flat
    else:
        valid = valid.reshape(-1)
        order = jnp.argsort(~valid, stable=True)  # valid entries first, in their original order
        count = jnp.maximum(valid.sum(), 1)
        pool = flat[order[jnp.arange(batch * k) % count]]
    return pool[jax.random.permutation(key, batch * k)].reshape(batch, k, dim)


def _check_inputs(student_global, student_local, teacher_global, boxes_gc, boxes_all, loss_mask, fg_mask):
    batch, num_global = student_global.shape[:2]
    num_views = num_global + student_local.shape[1]
    if teacher_global.shape[:2] != (batch, num_global) or teacher_global.shape[-1] != student_global.shape[-1]:
        raise ConfigError(
            f"teacher_global {teacher_global.shape} must match student_global {student_global.shape} in batch, "
            "crop count and feature size"
        )
    if boxes_gc.shape != (batch, num_global, num_views, 4) or boxes_all.shape != (batch, num_views, num_global, 4):
        raise ConfigError(
            f"boxes_gc {boxes_gc.shape} / boxes_all {boxes_all.shape} must be ({batch}, {num_global}, {num_views}, 4)"
            f" / ({batch}, {num_views}, {num_global}, 4) for {num_global} global and {num_views - num_global}"
            " local crops"
        )
    if loss_mask not in LOSS_MASKS:
        raise ConfigError(f"unknown loss_mask {loss_mask!r}; use one of {LOSS_MASKS}")
    if loss_mask != "all" and fg_mask is None:
        raise ConfigError(f"loss_mask={loss_mask!r} needs fg_mask (see neco_jax.fg_mask.attention_fg_mask)")


def neco_loss(
    student_global: jax.Array,
    student_local: jax.Array,
    teacher_global: jax.Array,
    boxes_gc: jax.Array,
    boxes_all: jax.Array,
    queue: queue_lib.QueueState | None,
    key: jax.Array,
    *,
    patch_size: int,
    student_steepness: float = 100.0,
    teacher_steepness: float = 100.0,
    network: str = "bitonic",
    distribution: str = "cauchy",
    similarity: str = "cosine",
    output_size: int = 7,
    loss_mask: str = "all",
    fg_mask: jax.Array | None = None,
    queue_per_image: int = 10,
    original_counter: bool = False,
    detach_teacher: bool = True,
) -> tuple[jax.Array, dict[str, Any], queue_lib.QueueState | None]:
    """The whole NeCo loss of one step (and the queue update that precedes it in the original).

    Args:
      student_global: (B, G, hg, wg, C) student head features of the G global crops (L2-normalised).
      student_local: (B, L, hl, wl, C) student head features of the local crops.
      teacher_global: (B, G, hg, wg, C) teacher head features of the global crops.
      boxes_gc: (B, G, V, 4) overlap of global g and crop v in g's resized frame, pixels (batch["boxes_gc"]).
      boxes_all: (B, V, G, 4) the same overlap in v's resized frame, pixels (batch["boxes_all"]).
      queue: queue state (see neco_jax.queue) or None for the batch-pool references.
      key: PRNG key (queue push, reference draws).
      patch_size: boxes are divided by it to get feature-map units.
      student_steepness, teacher_steepness, network, distribution: the two sorters.
      similarity: "cosine" (NeCo) or "euclidean" (``torch.cdist`` distance).
      output_size: ROI-align grid k; R = Q = k*k references and queries per image and pair.
      loss_mask: "all", or "fg"/"bg" (ablation) with ``fg_mask`` (B, G, hg, wg) the teacher's hard attention
        mask of the global crops ("bg" inverts it). The loss is then a masked mean over query patches,
        the batch pool keeps masked-in vectors, the queue receives only masked-in vectors.
      queue_per_image: vectors pushed per image per anchor crop (10 in NeCo).
      original_counter: the original's double-counting queue fill counter (see neco_jax.queue).
      detach_teacher: stop gradients through the teacher features (and so the references). The
        ``use_teacher=False`` ablation passes the student's own second forward of the global crops as
        ``teacher_global`` with ``detach_teacher=False``: the teacher's permutation matrix is still
        constant, but the batch-pool references then carry gradients, as in the original.

    Returns:
      (loss, aux, new_queue): float32 scalar; aux with "pair_losses" (G, V-1) (pair (g, j) is anchor g
      with the j-th other crop in order), "zero_reference_fraction" and, with a queue, "queue_filled";
      new_queue is None without a queue.
    """
    _check_inputs(student_global, student_local, teacher_global, boxes_gc, boxes_all, loss_mask, fg_mask)
    batch, num_global = student_global.shape[:2]
    num_views = num_global + student_local.shape[1]
    student_global = jnp.asarray(student_global, jnp.float32)
    student_local = jnp.asarray(student_local, jnp.float32)
    teacher_global = jnp.asarray(teacher_global, jnp.float32)
    if detach_teacher:
        teacher_global = jax.lax.stop_gradient(teacher_global)
    boxes_gc = jnp.asarray(boxes_gc, jnp.float32) / patch_size
    boxes_all = jnp.asarray(boxes_all, jnp.float32) / patch_size
    cells = output_size * output_size

    hard = None
    if loss_mask != "all":
        hard = jnp.asarray(fg_mask, jnp.float32)
        if loss_mask == "bg":
            hard = 1.0 - hard

    push_key, pair_key = jax.random.split(key)
    new_queue = None
    if queue is not None:
        valid = None if hard is None else hard > 0.5
        new_queue = queue_lib.push(
            queue,
            teacher_global,
            push_key,
            per_image=queue_per_image,
            valid=valid,
            original_counter=original_counter,
        )

    students, teachers, references, masks = [], [], [], []
    for g in range(num_global):
        others = [v for v in range(num_views) if v != g]
        aligned_t = roi_align(teacher_global[:, g], boxes_gc[:, g, others], output_size)  # (B, V-1, k, k, C)
        aligned_t = aligned_t.reshape(batch, len(others), cells, -1)
        if hard is not None:
            aligned_m = roi_align(hard[:, g, ..., None], boxes_gc[:, g, others], output_size)
            query_masks = aligned_m.reshape(batch, len(others), cells) >= MASK_ONE
        for j, v in enumerate(others):
            feats = student_global[:, v] if v < num_global else student_local[:, v - num_global]
            aligned_s = roi_align(feats, boxes_all[:, v, g], output_size).reshape(batch, cells, -1)
            ref_key = jax.random.fold_in(pair_key, g * num_views + v)
            if new_queue is not None:
                refs = queue_lib.sample(new_queue, g, batch * cells, ref_key).reshape(batch, cells, -1)
            else:
                refs = batch_pool(aligned_t[:, j], None if hard is None else query_masks[:, j], ref_key)
            students.append(aligned_s)
            teachers.append(aligned_t[:, j])
            references.append(refs)
            if hard is not None:
                masks.append(query_masks[:, j])

    references = jnp.stack(references)
    query_mask = jnp.stack(masks) if hard is not None else None
    per_pair = pair_loss(
        jnp.stack(students),
        jnp.stack(teachers),
        references,
        query_mask=query_mask,
        student_steepness=student_steepness,
        teacher_steepness=teacher_steepness,
        network=network,
        distribution=distribution,
        similarity=similarity,
    )
    per_pair = per_pair.reshape(num_global, num_views - 1)
    loss = jnp.mean(jnp.sum(per_pair, axis=1) / (num_views - 1))
    aux: dict[str, Any] = {
        "pair_losses": per_pair,
        "zero_reference_fraction": jnp.mean(jnp.all(references == 0, axis=-1)),
    }
    if new_queue is not None:
        aux["queue_filled"] = new_queue.filled
    return loss, aux, new_queue
