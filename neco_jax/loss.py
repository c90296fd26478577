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
from neco_jax.settings import SIMILARITIES, LossSettings
from neco_jax.sorting import sort

# Teacher vectors pushed into the queue per image and anchor crop (`bs * 10` in the original's `update_queue`).
QUEUE_PER_IMAGE = 10
# log(P) is clamped here: the original has no epsilon and gives -inf/NaN where P underflows to 0.
LOG_FLOOR = float(np.finfo(np.float32).tiny)
# A ROI-aligned binary mask cell counts as masked-in at 1.0 (the original's ">= 1.0"); the slack absorbs
# the rounding of bilinear weights that sum to exactly 1 (torchvision itself drops ~0.2% of such cells).
MASK_ONE = 1.0 - 1e-6
HP = jax.lax.Precision.HIGHEST


def similarity_matrix(queries: jax.Array, references: jax.Array, sim_dist: str) -> jax.Array:
    """(..., Q, D) x (..., R, D) -> (..., Q, R): cosine similarity, or Euclidean distance as ``torch.cdist``.

    Both are sorted ascending, as in the original (cosine: farthest reference first; euclidean: nearest).
    """
    queries = jnp.asarray(queries, jnp.float32)
    references = jnp.asarray(references, jnp.float32)
    if sim_dist == "cosine":
        return jnp.einsum("...qd,...rd->...qr", l2_normalize(queries), l2_normalize(references), precision=HP)
    if sim_dist == "euclidean":
        # cdist's matmul path: sqrt(clamp_min(|q|^2 + |r|^2 - 2 q.r, 1e-30)).
        sq = jnp.sum(queries**2, -1)[..., :, None] + jnp.sum(references**2, -1)[..., None, :]
        sq = sq - 2.0 * jnp.einsum("...qd,...rd->...qr", queries, references, precision=HP)
        return jnp.sqrt(jnp.maximum(sq, 1e-30))
    raise ConfigError(f"unknown similarity {sim_dist!r}; use one of {SIMILARITIES}")


def pair_loss(
    student: jax.Array,
    teacher: jax.Array,
    references: jax.Array,
    settings: LossSettings,
    *,
    query_mask: jax.Array | None = None,
) -> jax.Array:
    """The original's per-pair sub-loss ``-mean_{b,ref,q} sum_rank Q log P_s``, for one pair or stacked pairs.

    Args:
      student, teacher: (..., B, Q, D) ROI-aligned features of the student crop and the teacher anchor.
      references: (..., B, R, D), the same for both sides. Q (the teacher's matrix) is under stop_gradient;
        whether gradients reach the references is the caller's choice.
      settings: the sorters (sort_net, distribution, the two steepnesses) and the similarity (sim_dist).
      query_mask: optional (..., B, Q) fg/bg mask: the mean is over masked-in queries only (0 if none).

    Returns:
      float32 (...): one loss per pair.
    """
    # The image axis B goes first: `sort` flattens all leading axes into rows, and with B the outermost of
    # them the rows stay split over the data-parallel devices. With stacked pairs in front, the partitioner
    # could not split the merged rows and every device sorted the whole batch.
    sim_s = jnp.moveaxis(similarity_matrix(student, references, settings.sim_dist), -3, 0)
    sim_t = jnp.moveaxis(jax.lax.stop_gradient(similarity_matrix(teacher, references, settings.sim_dist)), -3, 0)
    sorter = {"network": settings.sort_net, "distribution": settings.distribution}
    _, p_s = sort(sim_s, steepness=settings.student_steepness, **sorter)
    _, p_t = sort(sim_t, steepness=settings.teacher_steepness, **sorter)
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


def _check_inputs(features: tuple, boxes: tuple, settings: LossSettings, fg_mask) -> None:
    student_global, student_local, teacher_global = features
    boxes_gc, boxes_all = boxes
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
    if settings.loss_mask != "all" and fg_mask is None:
        raise ConfigError(f"loss_mask={settings.loss_mask!r} needs fg_mask (see neco_jax.fg_mask.attention_fg_mask)")


def neco_loss(
    features: tuple[jax.Array, jax.Array, jax.Array],
    boxes: tuple[jax.Array, jax.Array],
    queue: queue_lib.QueueState | None,
    key: jax.Array,
    settings: LossSettings,
    *,
    patch_size: int,
    fg_mask: jax.Array | None = None,
    queue_per_image: int = QUEUE_PER_IMAGE,
) -> tuple[jax.Array, dict[str, Any], queue_lib.QueueState | None]:
    """The whole NeCo loss of one step (and the queue update that precedes it in the original).

    Args:
      features: (student_global, student_local, teacher_global), the L2-normalised head features of the G global
        crops (B, G, hg, wg, C) and the local crops (B, L, hl, wl, C) by the student, and of the global crops by
        the teacher. With settings.use_teacher False (the original's no-teacher ablation) teacher_global is the
        student's own second forward pass: its permutation matrix is still constant, but the batch-pool
        references then carry gradients, as in the original; otherwise no gradient reaches teacher_global.
      boxes: (boxes_gc (B, G, V, 4), boxes_all (B, V, G, 4)): the overlap of global g and crop v in g's resized
        frame, and in v's, in pixels (the batch's "boxes_gc" and "boxes_all").
      queue: queue state (see neco_jax.queue) or None for the batch-pool references.
      key: PRNG key (queue push, reference draws).
      settings: the loss settings; the ROI-align grid k = roi_align_kernel_size gives R = Q = k*k references
        and queries per image and pair; loss_mask "fg"/"bg" (an ablation) needs `fg_mask`.
      patch_size: boxes are divided by it to get feature-map units.
      fg_mask: (B, G, hg, wg) the teacher's hard attention mask of the global crops ("bg" inverts it). The loss
        is then a masked mean over query patches, the batch pool keeps masked-in vectors, the queue receives
        only masked-in vectors.
      queue_per_image: vectors pushed per image per anchor crop.

    Returns:
      (loss, aux, new_queue): float32 scalar; aux with "pair_losses" (G, V-1) (pair (g, j) is anchor g
      with the j-th other crop in order), "zero_reference_fraction" and, with a queue, "queue_filled";
      new_queue is None without a queue.
    """
    _check_inputs(features, boxes, settings, fg_mask)
    student_global, student_local, teacher_global = (jnp.asarray(f, jnp.float32) for f in features)
    if settings.use_teacher:
        teacher_global = jax.lax.stop_gradient(teacher_global)
    boxes = tuple(jnp.asarray(b, jnp.float32) / patch_size for b in boxes)
    hard = None
    if settings.loss_mask != "all":
        hard = jnp.asarray(fg_mask, jnp.float32)
        hard = 1.0 - hard if settings.loss_mask == "bg" else hard
    push_key, pair_key = jax.random.split(key)
    new_queue = None
    if queue is not None:
        new_queue = queue_lib.push(
            queue,
            teacher_global,
            push_key,
            per_image=queue_per_image,
            valid=None if hard is None else hard > 0.5,
            original_counter=settings.queue_original_counter,
        )
    features = (student_global, student_local, teacher_global)
    students, teachers, references, masks = _aligned_pairs(
        features, boxes, hard, new_queue, pair_key, settings.roi_align_kernel_size
    )
    per_pair = pair_loss(students, teachers, references, settings, query_mask=masks)
    num_global, num_views = student_global.shape[1], student_global.shape[1] + student_local.shape[1]
    per_pair = per_pair.reshape(num_global, num_views - 1)
    loss = jnp.mean(jnp.sum(per_pair, axis=1) / (num_views - 1))
    aux: dict[str, Any] = {
        "pair_losses": per_pair,
        "zero_reference_fraction": jnp.mean(jnp.all(references == 0, axis=-1)),
    }
    if new_queue is not None:
        aux["queue_filled"] = new_queue.filled
    return loss, aux, new_queue


def _aligned_pairs(features: tuple, boxes: tuple, hard, queue, key: jax.Array, size: int) -> tuple:
    """Every (anchor g, other crop v) pair, stacked: the student's and the teacher's ROI-aligned features on
    the pair's k x k grid (k = `size`), its references (from the queue, or the batch pool of the pair's
    aligned teacher features) and its query mask (None without `hard`). Shapes (pairs, B, k*k, ...)."""
    student_global, student_local, teacher_global = features
    boxes_gc, boxes_all = boxes
    batch, num_global = student_global.shape[:2]
    num_views = num_global + student_local.shape[1]
    cells = size * size
    students, teachers, references, masks = [], [], [], []
    for g in range(num_global):
        others = [v for v in range(num_views) if v != g]
        aligned_t = roi_align(teacher_global[:, g], boxes_gc[:, g, others], size)  # (B, V-1, k, k, C)
        aligned_t = aligned_t.reshape(batch, len(others), cells, -1)
        if hard is not None:
            aligned_m = roi_align(hard[:, g, ..., None], boxes_gc[:, g, others], size)
            query_masks = aligned_m.reshape(batch, len(others), cells) >= MASK_ONE
        for j, v in enumerate(others):
            feats = student_global[:, v] if v < num_global else student_local[:, v - num_global]
            aligned_s = roi_align(feats, boxes_all[:, v, g], size).reshape(batch, cells, -1)
            ref_key = jax.random.fold_in(key, g * num_views + v)
            if queue is not None:
                refs = queue_lib.sample(queue, g, batch * cells, ref_key).reshape(batch, cells, -1)
            else:
                refs = batch_pool(aligned_t[:, j], None if hard is None else query_masks[:, j], ref_key)
            students.append(aligned_s)
            teachers.append(aligned_t[:, j])
            references.append(refs)
            if hard is not None:
                masks.append(query_masks[:, j])
    stack = jnp.stack
    return stack(students), stack(teachers), stack(references), stack(masks) if masks else None
