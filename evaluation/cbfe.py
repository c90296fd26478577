"""Fully unsupervised VOC segmentation: cluster-based foreground extraction (CBFE) + community detection (CD).

Leopart's ``fully_unsup_seg.py`` as NeCo runs it (reference/evaluation_protocols.md section 3):
1. final-norm patch tokens of VOC ``train`` (1,464) and ``val`` (1,449) at 448 px, standardised and
   projected to 50 dims by a PCA fitted on both splits together;
2. noisy foreground masks from the last block's CLS attention: heads averaged, GaussianBlur(7,
   sigma 0.6) with reflect padding, the patches holding the top 65% of the attention mass, minus
   8-connected components of at most 2 patches;
3. CBFE: spherical k-means (K=200) over all patches; each cluster's precision against the noisy
   masks, averaged over the images it occurs in; on train, every cut that puts the lowest 55-75% of
   clusters in the background is scored by per-image foreground IoU against the ground truth (void
   counted as foreground), the best cut's precision rounded to the nearest 0.05 is the threshold;
   the same threshold is applied to val with val's own precisions;
4. foreground clustering: PCA features nearest-upsampled to 100x100, k-means (K = k_community) on
   foreground pixels only, background as label K;
5. CD (``community``): co-occurrence graph over train + val maps, Infomap runs; val maps merged by
   module and scored by Hungarian mIoU over 21 classes at 100x100 (void ignored), mean and std
   over runs. The "CBFE only" score (K=20 foreground clusters, 5 seeds) is reported as well.

Differences from the reference, where it cannot be followed: the attention is the true softmax
attention (NeCo's xformers path returned ``x @ v^T``); a cluster absent from a split gets precision
0 there (the reference asserts); an image with neither ground-truth nor predicted foreground has
IoU 1 (the reference divides 0 by 0); Infomap seeds are shifted by one (see ``community``). The
Optuna search for (k_community, markov_time, weight_threshold) is not included: give them in the config.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ml_collections
import numpy as np
from skimage.measure import label as connected_components

from evaluation import community
from evaluation.datasets import VOC_CLASSES
from evaluation.features import iterate_batches, nearest_indices, nearest_resize
from evaluation.kmeans import kmeans
from evaluation.metrics import confusion_matrix, match_clusters, miou
from evaluation.pca import standardize_and_project
from neco_jax.errors import UserError


class CbfeError(UserError):
    """A CBFE + CD setting that cannot work on the given data."""


@dataclasses.dataclass(frozen=True)
class CbfeSettings:
    """Defaults: Leopart/NeCo's values; (k_community, markov_time, weight_threshold) from the NeCo paper."""

    image_size: int = 448
    eval_size: int = 100
    batch_size: int = 64
    num_threads: int = 8
    pca_dim: int = 50
    pca_max_points_per_dim: int = 1000
    attention_keep: float = 0.65
    blur_size: int = 7
    blur_sigma: float = 0.6
    min_component: int = 3
    k_fg: int = 200
    kmeans_iters: int = 100
    kmeans_restarts: int = 5
    max_points_per_centroid: int = 256
    seed: int = 0
    cut_range: tuple[float, float] = (0.55, 0.75)
    k_community: int = 189
    markov_time: float = 1.2
    weight_threshold: float = 0.07
    num_runs: int = 10
    num_objects: int = 20
    evaluate_cbfe: bool = True
    cbfe_seeds: int = 5
    num_visualize: int = 0


# ----------------------------------------------------------------------------- noisy foreground from attention


def gaussian_blur(maps: np.ndarray, size: int, sigma: float) -> np.ndarray:
    """torchvision ``GaussianBlur(size, sigma)`` on (N, H, W) float maps: separable kernel, reflect padding."""
    half = (size - 1) * 0.5
    x = np.linspace(-half, half, size, dtype=np.float32)
    kernel = np.exp(-0.5 * (x / np.float32(sigma)) ** 2)
    kernel = (kernel / kernel.sum()).astype(np.float32)
    pad = size // 2
    padded = np.pad(maps.astype(np.float32), ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
    h, w = maps.shape[1:]
    rows = sum(kernel[i] * padded[:, i : i + h, :] for i in range(size))
    return sum(kernel[i] * rows[:, :, i : i + w] for i in range(size)).astype(np.float32)


def noisy_foreground(
    attention: np.ndarray,
    *,
    keep: float = 0.65,
    blur_size: int = 7,
    blur_sigma: float = 0.6,
    min_component: int = 3,
) -> np.ndarray:
    """Binary (N, h, w) foreground of CLS attention (N, heads, h, w), as Leopart's ``process_attentions``."""
    mean = attention.astype(np.float32).mean(axis=1)
    blurred = gaussian_blur(mean, blur_size, blur_sigma)
    n, h, w = blurred.shape
    flat = blurred.reshape(n, h * w)
    order = np.argsort(flat, axis=1, kind="stable")
    values = np.take_along_axis(flat, order, axis=1)
    cumulative = np.cumsum(values / values.sum(axis=1, keepdims=True), axis=1)
    kept_sorted = cumulative > (1 - keep)
    mask = np.zeros_like(kept_sorted)
    np.put_along_axis(mask, order, kept_sorted, axis=1)
    mask = mask.reshape(n, h, w)
    for i in range(n):
        components = connected_components(mask[i], connectivity=2)
        sizes = np.bincount(components.ravel())
        small = sizes < min_component
        small[0] = False
        mask[i][small[components]] = False
    return mask


# ----------------------------------------------------------------------------- CBFE


def cluster_precisions(clusters: np.ndarray, noisy: np.ndarray, k: int) -> np.ndarray:
    """(k,) precision of each cluster w.r.t. the noisy foreground, averaged over the images it occurs in."""
    n = clusters.shape[0]
    flat = (np.arange(n)[:, None] * k + clusters.reshape(n, -1)).ravel()
    totals = np.bincount(flat, minlength=n * k).reshape(n, k)
    hits = np.bincount(flat, weights=noisy.reshape(-1).astype(np.float64), minlength=n * k).reshape(n, k)
    present = totals > 0
    per_image = np.where(present, hits / np.maximum(totals, 1e-8), 0.0)
    occurrences = present.sum(axis=0)
    return np.where(occurrences > 0, per_image.sum(axis=0) / np.maximum(occurrences, 1), 0.0)


def foreground_jaccard(gt: np.ndarray, foreground: np.ndarray) -> float:
    """Mean per-image IoU of ``foreground`` with the ground-truth foreground (gt != 0, void included)."""
    gt_fg = gt != 0
    inter = (gt_fg & foreground).sum(axis=(1, 2))
    union = (gt_fg | foreground).sum(axis=(1, 2))
    return float(np.mean(np.where(union > 0, inter / np.maximum(union, 1), 1.0)))


def choose_threshold(
    clusters: np.ndarray, gt: np.ndarray, precisions: np.ndarray, cut_range: tuple[float, float] = (0.55, 0.75)
) -> tuple[float, list[tuple[int, float, float]]]:
    """The precision threshold, and every tried cut as (start, precision at the cut, train foreground IoU).

    Cuts put the ``start`` lowest-precision clusters in the background, start in
    [int(0.55 K), int(0.75 K)); the best IoU wins (the larger start on ties, as the reference's
    stable sort then last element) and its precision is rounded to the nearest multiple of 0.05.
    """
    k = len(precisions)
    order = np.argsort(precisions)
    rank = np.empty(k, np.int64)
    rank[order] = np.arange(k)
    cluster_rank = rank[clusters]
    sorted_precisions = np.sort(precisions)
    cuts = []
    for start in range(int(cut_range[0] * k), int(cut_range[1] * k)):
        cuts.append((start, float(sorted_precisions[start]), foreground_jaccard(gt, cluster_rank >= start)))
    if not cuts:
        raise CbfeError(f"k_fg={k} leaves no background cut in {cut_range}; use more clusters")
    ious = np.array([c[2] for c in cuts])
    best = cuts[int(np.flatnonzero(ious == ious.max())[-1])]
    grid = np.arange(0, 1, 0.05)
    threshold = float(grid[np.argmin(np.abs(grid - best[1]))])  # first of equally close: the reference's min()
    return threshold, cuts


def foreground_from_threshold(clusters: np.ndarray, precisions: np.ndarray, threshold: float) -> np.ndarray:
    """Foreground pixels: those whose cluster's precision reaches the threshold."""
    return (precisions >= threshold)[clusters]


# ----------------------------------------------------------------------------- foreground clustering


def cluster_foreground(
    features: np.ndarray, foreground: np.ndarray, k: int, *, seed: int, settings: CbfeSettings
) -> np.ndarray:
    """(N, E, E) maps: k-means ids of foreground pixels (features (N, h, w, D) nearest-upsampled), K on background."""
    n, e = foreground.shape[0], foreground.shape[1]
    rows = nearest_indices(features.shape[1], e)
    cols = nearest_indices(features.shape[2], e)
    img, r, c = np.nonzero(foreground)
    points = features[img, rows[r], cols[c]]
    if len(points) < k:
        raise CbfeError(f"only {len(points)} foreground pixels for {k} clusters; lower k_community or check the masks")
    result = kmeans(
        points, k, iters=settings.kmeans_iters, restarts=settings.kmeans_restarts, seed=seed,
        max_points_per_centroid=settings.max_points_per_centroid,
    )  # fmt: skip
    maps = np.full((n, e, e), k, np.int64)
    maps[img, r, c] = result.labels
    return maps


# ----------------------------------------------------------------------------- the protocol


def _extract(dataset, features_fn, s: CbfeSettings, desc: str):
    feats, attn, masks, images = [], [], [], []
    for batch in iterate_batches(
        dataset, batch_size=s.batch_size, image_size=s.image_size, mask_size=s.eval_size,
        num_threads=s.num_threads, desc=desc,
    ):  # fmt: skip
        f, a = features_fn(batch.images)
        feats.append(np.asarray(f, np.float32))
        attn.append(np.asarray(a, np.float32))
        masks.append(batch.masks)
    return np.concatenate(feats), np.concatenate(attn), np.concatenate(masks)


def evaluate_unsupervised(train_dataset, val_dataset, features_fn, *, settings: CbfeSettings = CbfeSettings()) -> dict:
    """CBFE + CD on VOC ``train`` / ``val``; ``features_fn(images)`` -> (patch tokens (B, h, w, D),
    CLS attention (B, heads, h, w)). Returns the scores and up to ``num_visualize`` val examples."""
    s = settings
    if s.k_community + 1 > 256:
        raise CbfeError(f"k_community={s.k_community}: the co-occurrence graph supports at most 255 clusters")
    train_feats, train_attn, train_gt = _extract(train_dataset, features_fn, s, "CBFE train features")
    val_feats, val_attn, val_gt = _extract(val_dataset, features_fn, s, "CBFE val features")
    n_train = len(train_feats)
    all_feats = np.concatenate([train_feats, val_feats])
    n, h, w, d = all_feats.shape
    pca = np.asarray(
        standardize_and_project(all_feats.reshape(-1, d), s.pca_dim, max_points_per_dim=s.pca_max_points_per_dim)
    ).reshape(n, h, w, -1)

    noisy = noisy_foreground(
        np.concatenate([train_attn, val_attn]), keep=s.attention_keep, blur_size=s.blur_size,
        blur_sigma=s.blur_sigma, min_component=s.min_component,
    )  # fmt: skip
    noisy = nearest_resize(noisy, s.eval_size)
    coarse = kmeans(
        pca.reshape(-1, pca.shape[-1]), s.k_fg, iters=s.kmeans_iters, restarts=s.kmeans_restarts, seed=s.seed,
        max_points_per_centroid=s.max_points_per_centroid, spherical=True,
    ).labels.reshape(n, h, w)  # fmt: skip
    coarse = nearest_resize(coarse, s.eval_size)

    train_precisions = cluster_precisions(coarse[:n_train], noisy[:n_train], s.k_fg)
    threshold, cuts = choose_threshold(coarse[:n_train], train_gt, train_precisions, s.cut_range)
    val_precisions = cluster_precisions(coarse[n_train:], noisy[n_train:], s.k_fg)
    foreground = np.concatenate([
        foreground_from_threshold(coarse[:n_train], train_precisions, threshold),
        foreground_from_threshold(coarse[n_train:], val_precisions, threshold),
    ])  # fmt: skip

    results = {
        "threshold": round(threshold, 2),  # a multiple of 0.05 (np.arange's value, e.g. 0.9500000000000001)
        "fg_iou_train": foreground_jaccard(train_gt, foreground[:n_train]),
        "fg_iou_val": foreground_jaccard(val_gt, foreground[n_train:]),
        "cuts": [{"start": a, "precision": b, "fg_iou": c} for a, b, c in cuts],
    }
    if s.evaluate_cbfe:
        scores = []
        for seed in range(s.cbfe_seeds):
            maps = cluster_foreground(pca, foreground, s.num_objects, seed=seed, settings=s)
            scores.append(miou(maps[n_train:], val_gt, num_classes=21, ignore_index=255, matching="hungarian")[0])
        results["miou_cbfe"] = float(np.mean(scores))

    fine = cluster_foreground(pca, foreground, s.k_community, seed=s.seed, settings=s)
    adjacency = community.cooccurrence_matrix(fine, s.k_community + 1)
    edges = community.graph_edges(adjacency, s.weight_threshold)
    runs, best = [], None
    for r in range(s.num_runs):
        modules = community.detect_communities(
            edges, markov_time=s.markov_time, seed=r + 1, preferred_modules=s.num_objects
        )
        merged = community.merge_clusters(fine[n_train:], modules)
        score, per_class = miou(merged, val_gt, num_classes=21, ignore_index=255, matching="hungarian")
        runs.append({"run": r, "miou": score, "segments": int(len(np.unique(merged)))})
        if best is None or score > best[0]:
            best = (score, merged, per_class)
    scores = [row["miou"] for row in runs]
    results.update(
        miou=float(np.mean(scores)), miou_std=float(np.std(scores)), per_class_iou=best[2].tolist(),
        runs=runs, edges=len(edges),
    )  # fmt: skip
    results["examples"] = _examples(val_dataset, val_gt, best[1], s)
    return results


def _examples(dataset, gt: np.ndarray, segments: np.ndarray, s: CbfeSettings) -> list:
    """(image, ground truth, segments as matched classes, overlay) for the first ``num_visualize`` val images."""
    if not s.num_visualize:
        return []
    from evaluation.features import resize_image
    from evaluation.visualize import label_colors

    conf = confusion_matrix(segments, gt, num_classes=21, num_pred=int(segments.max()) + 1, ignore_index=255)
    as_classes = match_clusters(conf, "hungarian")[segments]
    examples = []
    for i in range(min(s.num_visualize, len(gt))):
        image = resize_image(dataset.image(i), s.image_size)
        big = nearest_resize(as_classes[i], s.image_size)
        overlay = np.where((big > 0)[..., None], 0.45 * image + 0.55 * label_colors(big), image)
        examples.append((image, gt[i], as_classes[i], overlay.astype(np.uint8)))
    return examples


def settings_from_config(config: ml_collections.ConfigDict) -> CbfeSettings:
    values = {**config.cbfe.to_dict(), "cut_range": tuple(config.cbfe.cut_range)}
    return CbfeSettings(
        image_size=config.image_size, eval_size=config.mask_size, batch_size=config.batch_size,
        num_threads=config.num_threads, num_visualize=config.num_visualize, **values,
    )  # fmt: skip


def run(config: ml_collections.ConfigDict) -> dict:
    """The protocol entry of ``python -m evaluation`` (see configs/eval/voc_cbfe.py)."""
    from evaluation.runner import ConfigError, make_extractor, open_split
    from evaluation.visualize import save_segmentation_panels

    if config.dataset != "voc":
        raise ConfigError(f"CBFE + CD is defined on Pascal VOC only, not {config.dataset!r}")
    extractor = make_extractor(config)
    train = open_split(config, config.train_split)
    val = open_split(config, config.val_split)
    results = evaluate_unsupervised(train, val, extractor.with_attention, settings=settings_from_config(config))
    examples = results.pop("examples")
    if examples:
        save_segmentation_panels(
            examples, Path(config.workdir) / "cbfe", num_classes=21,
            titles=["image", "ground truth", "CBFE + CD (matched)", "overlay"],
        )  # fmt: skip
    return {**results, "class_names": list(VOC_CLASSES)}
