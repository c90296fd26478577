"""NeCo loss vs an independent torch + diffsort + torchvision implementation of the original's formula."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffsort import DiffSortNet
from torchvision.ops import roi_align as tv_roi_align

from neco_jax import loss as loss_lib
from neco_jax import queue as queue_lib
from neco_jax.settings import LossSettings

B, G, L, HG, HL, C, PATCH, K = 3, 2, 2, 5, 3, 16, 14, 3  # K: ROI grid (n = 9 references)
V = G + L
# Loss vs the torch reference, relative error: measured <= 3.3e-7 on the CPU (batch pool 2.3e-7, queue 3.2e-7 and
# 3.3e-7, fg mask 1.9e-7, masked pair 1.6e-7); the bound is 3x the worst.
LOSS_RTOL = 1e-6


def _check_loss(out, ref):
    err = abs(float(out) - ref) / abs(ref)
    print(f"loss relative error {err:.2e}")
    assert err <= LOSS_RTOL, (float(out), ref)


def _boxes(rng):
    """Random overlap boxes in pixels: gc in the global frame (0..HG*14), all in each crop's frame."""

    def rand_box(size, n):
        a = rng.uniform(0, size * 0.6, (n, 2))
        b = a + rng.uniform(size * 0.2, size * 0.6, (n, 2))
        return np.concatenate([a, np.minimum(b, size)], -1)

    gc = rand_box(HG * PATCH, B * G * V).reshape(B, G, V, 4)
    all_ = np.zeros((B, V, G, 4))
    for v in range(V):
        all_[:, v] = rand_box((HG if v < G else HL) * PATCH, B * G).reshape(B, G, 4)
    return gc.astype(np.float32), all_.astype(np.float32)


def _unit(rng, *shape):
    x = rng.normal(size=shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    gc, all_ = _boxes(rng)
    return dict(
        sg=_unit(rng, B, G, HG, HG, C),
        sl=_unit(rng, B, L, HL, HL, C),
        tg=_unit(rng, B, G, HG, HG, C),
        gc=gc,
        all=all_,
    )


def _torch_loss(d, refs_fn, steep_s, steep_t, net, masks=None):
    """The original's knn_loss (vpariza/NeCo src/neco.py), with the references supplied per pair by refs_fn (None:
    the pair is skipped)."""
    sg, sl, tg = (torch.tensor(d[k], dtype=torch.float64) for k in ("sg", "sl", "tg"))
    sorter_s = DiffSortNet(net, K * K, steepness=steep_s)
    sorter_t = DiffSortNet(net, K * K, steepness=steep_t)
    sorter_s.sorting_network = [[m.double() for m in layer] for layer in sorter_s.sorting_network]
    sorter_t.sorting_network = [[m.double() for m in layer] for layer in sorter_t.sorting_network]

    def perm(src, ref, sorter):
        dist = torch.einsum("bqc,brc->bqr", F.normalize(src, dim=-1), F.normalize(ref, dim=-1))
        return sorter(dist.reshape(-1, K * K))[1].reshape(B, K * K, K * K, K * K)  # (b, q, ref, rank)

    total = 0.0
    for g in range(G):
        t_map = tg[:, g].permute(0, 3, 1, 2)
        t_boxes = torch.tensor(d["gc"][:, g], dtype=torch.float64) / PATCH
        t_al = tv_roi_align(t_map, list(t_boxes), K, aligned=True)  # (B*V, C, K, K), image-major
        sub = 0.0
        for v in [v for v in range(V) if v != g]:
            s_map = (sg[:, v] if v < G else sl[:, v - G]).permute(0, 3, 1, 2)
            s_boxes = torch.tensor(d["all"][:, v, g], dtype=torch.float64)[:, None] / PATCH
            s_al = tv_roi_align(s_map, list(s_boxes), K, aligned=True)
            t_sel = t_al[v::V]
            s_q = s_al.permute(0, 2, 3, 1).reshape(B, K * K, C)
            t_q = t_sel.permute(0, 2, 3, 1).reshape(B, K * K, C)
            refs = refs_fn(g, v, t_q)
            if refs is None:
                continue
            p = perm(s_q, refs, sorter_s)
            with torch.no_grad():
                q = perm(t_q, refs, sorter_t)
            ce = -(q * torch.log(p)).sum(-1)  # (b, q, ref)
            if masks is None:
                sub = sub + ce.mean()
            else:
                m = masks(g, v)  # (B, Q)
                sub = sub + ((ce * m[:, :, None]).sum() / (m.sum() * K * K) if m.sum() > 0 else 0.0)
        total = total + sub / (V - 1)
    return total / G


# The original's reference patches (vpariza/NeCo src/neco.py, `knn_loss` and `update_queue`), written out below in
# torch. Its random draws are calls to torch.randperm on the global generator, a fresh one per pair in pair order;
# neco-jax draws them from the step key instead (`_pair_permutation`), so both sides are given the same ones.


def _pair_permutation(key, g, v, n):
    """neco-jax's random permutation of range(n) for pair (anchor g, crop v) of a step with PRNG key `key`.

    A deliberate difference from the original's torch.randperm (README, "Differences from the original training
    code"): fold_in(second half of split(key), g * V + v), so a step's references follow from its key alone and are
    the same on every device. The loss tests match only with exactly these permutations, which checks the rule;
    test_loss_equals_reference_queue_mode checks that a step is reproducible from its key.
    """
    _, pair_key = jax.random.split(key)
    return torch.tensor(np.asarray(jax.random.permutation(jax.random.fold_in(pair_key, g * V + v), n)))


def original_pool_references(aligned_teacher, pool_mask, perm):
    """knn_loss without a queue: the pair's ROI-aligned teacher vectors in image-major order (B*k*k of them), those
    where `pool_mask` holds (fg/bg ablation) or all, repeated `round(n / kept) + 1` times and cut to n = B*k*k,
    then reordered by the random permutation `perm` and cut into B groups of k*k."""
    flat = aligned_teacher.reshape(-1, C)
    n = flat.shape[0]
    pool = flat if pool_mask is None else flat[pool_mask.reshape(-1)]
    return pool.repeat(round(n / pool.shape[0]) + 1, 1)[:n][perm].reshape(B, K * K, C)


class OriginalQueue:
    """The original's reference queue: one zero queue of `length` per anchor crop. `update_queue` runs before the
    loss: each anchor pushes min(10 B, length) of its teacher vectors, drawn without replacement, at the front
    (older ones shift back) and adds that count to `entries_in_queue`; knn_loss draws a pair's references as
    queue[i][randperm(length)[:n] mod entries_in_queue].

    The original keeps ONE entries_in_queue for all anchors, so with 2 anchors it counts every push twice and
    wraps past what a queue holds (never-written zero slots are drawn early). neco-jax's default counts each
    queue's own entries (README, "Differences from the original training code"): `shared_counter=False`.
    """

    def __init__(self, anchors, length, shared_counter=True):
        self.queue = torch.zeros(anchors, length, C, dtype=torch.float64)
        self.length, self.shared_counter = length, shared_counter
        self.entries = [0] * anchors

    def push(self, i, emb_gc, idx):
        """emb_gc: (B*h*w, C) teacher vectors of anchor i, image-major; idx: the drawn rows (randperm(B*h*w)[:num])."""
        num = len(idx)
        for a in range(len(self.entries)) if self.shared_counter else [i]:
            self.entries[a] = min(self.entries[a] + num, self.length)
        self.queue[i, num:] = self.queue[i, :-num].clone()
        self.queue[i, :num] = emb_gc[idx]

    def draw(self, i, perm):
        """A pair's B groups of k*k references from anchor i's queue; perm: a random permutation of range(length)."""
        idces = torch.remainder(perm[: B * K * K], self.entries[i])
        return self.queue[i][idces].reshape(B, K * K, C)


def _drawn_rows(pushed, emb_gc):
    """Which rows of emb_gc the push took, in push order: the draw the original makes with torch.randperm."""
    match = np.all(pushed[:, None] == emb_gc[None], axis=-1)  # (num, B*h*w)
    assert (match.sum(1) == 1).all()  # every pushed vector is one teacher vector
    idx = match.argmax(1)
    assert len(set(idx.tolist())) == len(idx)  # without replacement
    return torch.tensor(idx)


def _jitted_loss(settings: LossSettings, **kwargs):
    """`neco_loss` with these settings, jitted as the train step runs it (one program, not hundreds of
    single-op ones)."""
    return jax.jit(functools.partial(loss_lib.neco_loss, settings=settings, patch_size=PATCH, **kwargs))


@pytest.mark.slow
def test_loss_equals_reference_with_given_references(data):
    """Batch-pool path: the original's pool of the pair's aligned teacher vectors."""
    key = jax.random.PRNGKey(3)
    settings = LossSettings(student_steepness=20.0, teacher_steepness=50.0, roi_align_kernel_size=K)
    out, aux, _ = _jitted_loss(settings)((data["sg"], data["sl"], data["tg"]), (data["gc"], data["all"]), None, key)

    def refs_fn(g, v, t_q):
        return original_pool_references(t_q, None, _pair_permutation(key, g, v, B * K * K))

    ref = _torch_loss(data, refs_fn, 20.0, 50.0, "bitonic").item()
    _check_loss(out, ref)
    assert aux["pair_losses"].shape == (G, V - 1)


@pytest.mark.parametrize("original_counter", [True, False], ids=["original-counter", "own-counter"])
def test_loss_equals_reference_queue_mode(data, original_counter):
    """Queue path, first step: the queues are pushed (5 vectors per image, 15 of 64 slots per anchor), then each
    pair draws its references as the original does. With the original's shared counter (30) zero slots are among
    the references, cosine 0 with everything; with neco-jax's own count (15) none are."""
    key, length, per_image = jax.random.PRNGKey(5), 64, 5
    settings = LossSettings(roi_align_kernel_size=K, sort_net="odd_even", queue_original_counter=original_counter)
    step = _jitted_loss(settings, queue_per_image=per_image)
    args = ((data["sg"], data["sl"], data["tg"]), (data["gc"], data["all"]), queue_lib.init(G, length, C))
    out, aux, q1 = step(*args, key)

    original = OriginalQueue(G, length, shared_counter=original_counter)
    for i in range(G):
        emb_gc = data["tg"][:, i].reshape(-1, C)
        pushed = np.asarray(q1.vectors)[i, : B * per_image]
        original.push(i, torch.tensor(emb_gc, dtype=torch.float64), _drawn_rows(pushed, emb_gc))
    np.testing.assert_array_equal(np.asarray(q1.vectors), original.queue.numpy())
    assert np.asarray(q1.filled).tolist() == original.entries == ([30, 30] if original_counter else [15, 15])
    assert (float(aux["zero_reference_fraction"]) > 0) == original_counter

    def refs_fn(g, v, t_q):
        return original.draw(g, _pair_permutation(key, g, v, length))

    ref = _torch_loss(data, refs_fn, 100.0, 100.0, "odd_even").item()
    _check_loss(out, ref)
    # Keyed draws (the deliberate difference above): the same key gives the same step, another key another one.
    assert float(step(*args, key)[0]) == float(out)
    assert float(step(*args, jax.random.PRNGKey(6))[0]) != float(out)


@pytest.mark.slow
def test_gradients_reach_only_student(data):
    def f(sg, sl, tg):
        boxes, settings = (data["gc"], data["all"]), LossSettings(roi_align_kernel_size=K)
        return loss_lib.neco_loss((sg, sl, tg), boxes, None, jax.random.PRNGKey(0), settings, patch_size=PATCH)[0]

    gs, gl, gt = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(data["sg"], data["sl"], data["tg"])
    assert np.abs(gs).max() > 0 and np.abs(gl).max() > 0 and np.all(np.isfinite(gs))
    assert np.abs(gt).max() == 0
    # use_teacher=False ablation: references (from the "teacher" input) then carry gradient.
    g2 = jax.jit(
        jax.grad(
            lambda tg: loss_lib.neco_loss(
                (data["sg"], data["sl"], tg),
                (data["gc"], data["all"]),
                None,
                jax.random.PRNGKey(0),
                LossSettings(roi_align_kernel_size=K, use_teacher=False),
                patch_size=PATCH,
            )[0]
        )
    )(data["tg"])
    assert np.abs(g2).max() > 0


def test_student_equal_teacher_is_lower(data):
    settings, boxes, key = LossSettings(roi_align_kernel_size=K), (data["gc"], data["all"]), jax.random.PRNGKey(1)
    loss = _jitted_loss(settings)
    same = loss((data["tg"], data["sl"], data["tg"]), boxes, None, key)[0]
    rand = loss((data["sg"], data["sl"], data["tg"]), boxes, None, key)[0]
    assert float(same) < float(rand)
    t, r, s = (jnp.asarray(data[k][:, i, :3, :3].reshape(B, 9, C)) for k, i in (("tg", 0), ("tg", 1), ("sg", 0)))
    assert float(loss_lib.pair_loss(t, t, r, settings)) < float(loss_lib.pair_loss(s, t, r, settings))


def test_masked_pair_loss_matches_reference():
    rng = np.random.default_rng(1)
    s, t, r = _unit(rng, B, 9, C), _unit(rng, B, 9, C), _unit(rng, B, 9, C)
    mask = rng.uniform(size=(B, 9)) > 0.5
    out = loss_lib.pair_loss(s, t, r, LossSettings(sort_net="odd_even", student_steepness=30.0), query_mask=mask)
    sorter_s = DiffSortNet("odd_even", 9, steepness=30.0)
    sorter_t = DiffSortNet("odd_even", 9, steepness=100.0)

    def perm(x, sorter):
        d = torch.einsum("bqc,brc->bqr", F.normalize(torch.tensor(x), dim=-1), F.normalize(torch.tensor(r), dim=-1))
        return sorter(d.reshape(-1, 9))[1].reshape(B, 9, 9, 9)

    ce = -(perm(t, sorter_t) * torch.log(perm(s, sorter_s))).sum(-1)
    m = torch.tensor(mask, dtype=torch.float32)
    ref = ((ce * m[:, :, None]).sum() / (m.sum() * 9)).item()
    _check_loss(out, ref)
    zero = loss_lib.pair_loss(s, t, r, LossSettings(), query_mask=np.zeros((B, 9), bool))
    assert float(zero) == 0.0


def test_euclidean_matches_cdist():
    rng = np.random.default_rng(2)
    q, r = rng.normal(size=(2, 30, 8)).astype(np.float32), rng.normal(size=(2, 30, 8)).astype(np.float32)
    ref = torch.cdist(torch.tensor(q), torch.tensor(r), compute_mode="use_mm_for_euclid_dist_if_necessary").numpy()
    out = np.asarray(loss_lib.similarity_matrix(q, r, "euclidean"))
    assert np.abs(out - ref).max() <= 2e-7 * np.abs(ref).max()  # measured 6.6e-8 (float32 both), bound 3x
    z = np.asarray(loss_lib.similarity_matrix(q, np.zeros_like(r), "cosine"))
    assert (z == 0).all()


def _original_thresholded_mask(fg, boxes_gc, g, threshold):
    """knn_loss's `thresholded_mask` for anchor g: its hard mask ROI-aligned on its boxes with every crop, rows in
    image-major order (row b * V + v), cells counted as masked-in at `threshold` (the original: >= 1.0)."""
    boxes = list(torch.tensor(boxes_gc[:, g], dtype=torch.float64) / PATCH)  # B boxes lists of V boxes
    aligned = tv_roi_align(torch.tensor(fg[:, g, None], dtype=torch.float64), boxes, K, aligned=True)
    return aligned[:, 0] >= threshold  # (B * V, k, k)


def test_fg_masked_loss_equals_reference(data):
    """loss_mask='fg' in batch-pool mode: masked queries, pool filtered to masked-in vectors.

    Two deliberate differences from the original (README, "Differences from the original training code"), both
    checked here by computing the loss with the original's rule too, which these data tell apart:
    - the pool filter: the original takes rows [B g, B (g+1)) of the image-major thresholded mask
      (`thresholded_mask[bs * crop_id: bs * (crop_id + 1)]`), which are not pair (g, v)'s rows, while its query
      mask takes the pair's rows v::V (`compute_knn_subloss`); neco-jax filters the pool with the pair's rows;
    - the threshold: the original's ">= 1.0" drops fully covered cells whose bilinear weights round below 1
      (2 of 17 such cells here, in float64); neco-jax counts >= 1 - 1e-6.
    """
    rng = np.random.default_rng(4)
    fg = (rng.uniform(size=(B, G, HG, HG)) < 0.8).astype(np.float32)
    key = jax.random.PRNGKey(11)
    out, _, _ = _jitted_loss(LossSettings(roi_align_kernel_size=K, loss_mask="fg"))(
        (data["sg"], data["sl"], data["tg"]), (data["gc"], data["all"]), None, key, fg_mask=fg
    )

    def reference(threshold, original_pool_rows):
        masks = [_original_thresholded_mask(fg, data["gc"], g, threshold) for g in range(G)]

        def query_mask(g, v):
            return masks[g][v::V].reshape(B, K * K).double()

        def refs_fn(g, v, t_q):
            pool_mask = masks[g][B * g : B * (g + 1)] if original_pool_rows else masks[g][v::V]
            if not pool_mask.any():
                return None  # the original skips the pair (`continue`)
            return original_pool_references(t_q, pool_mask, _pair_permutation(key, g, v, B * K * K))

        return float(_torch_loss(data, refs_fn, 100.0, 100.0, "bitonic", masks=query_mask))

    ref = reference(1.0 - 1e-6, original_pool_rows=False)
    assert ref > 0
    _check_loss(out, ref)
    for original_rule in (reference(1.0, False), reference(1.0 - 1e-6, True)):
        assert abs(float(out) - original_rule) > 1e-3 * abs(ref), (float(out), original_rule)


def test_each_device_sorts_only_its_own_images():
    """On a 4-device data-parallel mesh the compiled loss sorts B/4 images' rows per device: no relaxed
    permutation matrix (rows, n, n) of the whole batch is ever formed (each device sorting everything was a
    4x cost on 4 devices)."""
    import re

    from neco_jax import sharding

    mesh = sharding.make_mesh(jax.devices()[:4])
    batch, rows = 8, G * (V - 1) * K * K  # rows per image: every pair's query patches
    rng = np.random.default_rng(1)
    gc, all_ = (np.tile(b, (3, 1, 1, 1))[:batch] for b in _boxes(rng))
    args = [_unit(rng, batch, G, HG, HG, C), _unit(rng, batch, L, HL, HL, C), _unit(rng, batch, G, HG, HG, C), gc, all_]
    args = [jax.device_put(a, sharding.batch_sharding(mesh)) for a in args]

    def loss(sg, sl, tg, gc, all_):
        settings = LossSettings(roi_align_kernel_size=K)
        return loss_lib.neco_loss((sg, sl, tg), (gc, all_), None, jax.random.key(0), settings, patch_size=PATCH)[0]

    hlo = jax.jit(jax.grad(loss)).lower(*args).compile().as_text()
    sorted_rows = {int(m) for m in re.findall(rf"f32\[(?:\d+,)?(\d+),{K * K},{K * K}\]", hlo)}
    assert sorted_rows and max(sorted_rows) == batch // 4 * rows, sorted_rows
