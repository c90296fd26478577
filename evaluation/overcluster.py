"""Overclustering (NeCo `eval_overcluster.py`, Leopart protocol): k-means of the val patch features themselves.

Features of every val image at the input size (448 -> 32x32 for /14) are standardised and projected to 50
dims by PCA (once), then clustered with k-means for every K and seed. Cluster maps are nearest-upsampled
(torch style) to the 100x100 masks; pixels whose label is the ignore index are dropped. K equal to the class
count is matched by Hungarian matching, larger K many-to-one by precision; mIoU is averaged over seeds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import ml_collections
import numpy as np
from tqdm import tqdm

from evaluation import metrics
from evaluation.datasets import SegmentationDataset
from evaluation.features import FeaturesFn, extract_features, nearest_resize, resize_image
from evaluation.job_inputs import make_extractor, open_split
from evaluation.kmeans import kmeans
from evaluation.pca import standardize_and_project
from evaluation.settings import from_config
from evaluation.visualize import cluster_colors, pca_rgb, save_panel_row
from neco_jax.errors import ConfigError, UserError


def default_ks(num_classes: int) -> tuple[int, ...]:
    """The reference's cluster counts: the class count (Hungarian matching), 300 and 500 (many-to-one)."""
    return (num_classes, 300, 500)


@dataclasses.dataclass(frozen=True)
class OverclusterSettings:
    """The protocol's knobs; the defaults are the reference's (NeCo ``eval_overcluster.py`` with faiss's k-means).

    The job configs' ``config.overcluster`` is built from these defaults (see ``evaluation.settings``).
    """

    # Cluster counts (`default_ks`); K == num_classes uses Hungarian matching, larger K many-to-one by precision.
    ks: Sequence[int]
    # k-means seeds (results averaged), restarts per seed (best objective kept), Lloyd iterations.
    seeds: Sequence[int] = (0, 1, 2, 3, 4)
    restarts: int = 5
    iters: int = 100
    # Centroid init: "random" (distinct random points, as faiss) or "kmeans++".
    init: str = "random"
    # PCA target dimension, and faiss's training subsample: at most pca_max_points_per_dim * D vectors (0 = all).
    pca_dim: int = 50
    pca_max_points_per_dim: int = 1000
    # faiss's k-means training subsample: at most max_points_per_centroid * K points (0 = all points).
    max_points_per_centroid: int = 256


def cluster_features(
    features: np.ndarray, masks: np.ndarray, *, num_classes: int, ignore_index: int, settings: OverclusterSettings
) -> dict:
    """Clusters (N, h, w, D) features and scores them against (N, m, m) masks.

    Returns {"miou": mIoU at the largest K (averaged over seeds), "runs": one row per K,
    "miou_k<K>": each K's mean, "cluster_maps": {K: (N, h, w) cluster ids of the first seed}}.
    """
    n, h, w, d = features.shape
    if max(settings.ks) > n * h * w:
        raise UserError(
            f"K={max(settings.ks)} clusters need at least that many patches, but {n} images give {n * h * w}; "
            "lower config.overcluster.ks or evaluate more images"
        )
    if settings.pca_dim > d:
        raise ValueError(f"pca_dim={settings.pca_dim} exceeds the feature dimension {d}")
    reduced = standardize_and_project(
        features.reshape(-1, d), settings.pca_dim, max_points_per_dim=settings.pca_max_points_per_dim
    )
    runs, maps, results = [], {}, {}
    jobs = [(k, s) for k in settings.ks for s in settings.seeds]
    scores: dict[int, list[float]] = {k: [] for k in settings.ks}
    for k, seed in tqdm(jobs, desc="k-means", unit="run"):
        res = kmeans(
            reduced,
            k,
            iters=settings.iters,
            restarts=settings.restarts,
            seed=seed,
            init=settings.init,
            max_points_per_centroid=settings.max_points_per_centroid,
        )
        clusters = res.labels.reshape(n, h, w)
        maps.setdefault(k, clusters)
        pred = nearest_resize(clusters, masks.shape[-2:])
        matching = "hungarian" if k == num_classes else "precision"
        conf = metrics.confusion_matrix(
            pred, masks, num_classes=num_classes, num_pred=max(k, num_classes), ignore_index=ignore_index
        )
        scores[k].append(metrics.miou_from_confusion(conf, matching)[0])
    for k in settings.ks:
        per_seed = np.array(scores[k])
        row = {"k": k, "matching": "hungarian" if k == num_classes else "precision", "miou": float(per_seed.mean())}
        row.update(miou_std=float(per_seed.std()), seeds=len(per_seed))
        runs.append(row)
        results[f"miou_k{k}"] = row["miou"]
    headline = max(settings.ks)
    return {"miou": results[f"miou_k{headline}"], "headline_k": headline, **results, "runs": runs, "cluster_maps": maps}


def evaluate(
    dataset: SegmentationDataset,
    features_fn: FeaturesFn,
    *,
    settings: OverclusterSettings,
    image_size: int,
    mask_size: int,
    batch_size: int = 32,
    drop_remainder: int = 0,
    num_threads: int = 8,
) -> dict:
    """Overclustering of a val split with any `features_fn(images) -> (B, h, w, D)`; see `cluster_features`.

    Also returns "features" (N, h, w, D) and "masks" for pictures; `drop_remainder` keeps only a multiple of
    that many images (the reference VOC loader's drop_last).
    """
    count = len(dataset) - (len(dataset) % drop_remainder if drop_remainder else 0)
    count = count or len(dataset)  # fewer images than one reference batch: keep them all
    feats, masks = extract_features(
        features_fn,
        dataset,
        image_size=image_size,
        mask_size=mask_size,
        batch_size=batch_size,
        indices=range(count),
        num_threads=num_threads,
    )
    out = cluster_features(
        feats, masks, num_classes=dataset.num_classes, ignore_index=dataset.ignore_index, settings=settings
    )
    return {**out, "images": count, "features": feats, "masks": masks}


def save_pictures(results: dict, dataset: SegmentationDataset, folder: Path, *, image_size: int, count: int) -> None:
    """folder/example_<i>.png: image | ground truth | clusters mapped to classes | raw clusters | PCA of features,
    for the largest K and its first seed."""
    k = results["headline_k"]
    clusters, masks = results["cluster_maps"][k], results["masks"]
    count = min(count, len(clusters))
    if not count:
        return
    num_classes, ignore = dataset.num_classes, dataset.ignore_index
    conf = metrics.confusion_matrix(
        nearest_resize(clusters, masks.shape[-2:]),
        masks,
        num_classes=num_classes,
        num_pred=max(k, num_classes),
        ignore_index=ignore,
    )
    mapping = metrics.match_clusters(conf, "hungarian" if k == num_classes else "precision")
    colours = pca_rgb(results["features"][:count])
    titles = ["image", "ground truth", f"K={k} matched", f"K={k} clusters", "PCA of features"]
    for i in range(count):
        image = resize_image(dataset.image(i), image_size)
        save_panel_row(
            [image, masks[i], mapping[clusters[i]], cluster_colors(clusters[i]), colours[i]],
            Path(folder) / f"example_{i:03d}.png",
            titles,
        )


def settings_from_config(config: ml_collections.ConfigDict) -> OverclusterSettings:
    return from_config(OverclusterSettings, config.overcluster)


def run(config: ml_collections.ConfigDict, model=None) -> dict:
    """The protocol entry of `python -m evaluation` (configs/eval/<dataset>_overcluster.py)."""
    oc = config.overcluster
    if oc.init not in ("random", "kmeans++"):
        raise ConfigError(f"config.overcluster.init={oc.init!r}; use 'random' or 'kmeans++'")
    if not oc.ks or min(oc.ks) < 2 or not oc.seeds or oc.restarts < 1 or oc.iters < 1:
        raise ConfigError("config.overcluster needs ks >= 2, at least one seed, restarts >= 1 and iters >= 1")
    val = open_split(config, config.val_split)
    if oc.pca_dim < 1:
        raise ConfigError(f"config.overcluster.pca_dim must be positive, got {oc.pca_dim}")
    extractor = make_extractor(config, model)
    if oc.pca_dim > extractor.embed_dim:
        raise ConfigError(f"config.overcluster.pca_dim={oc.pca_dim} exceeds the backbone's width {extractor.embed_dim}")
    results = evaluate(
        val,
        extractor,
        settings=settings_from_config(config),
        image_size=config.image_size,
        mask_size=config.mask_size,
        batch_size=config.batch_size,
        drop_remainder=oc.drop_remainder,
        num_threads=config.num_threads,
    )
    folder = Path(config.workdir) / "clusters"
    save_pictures(results, val, folder, image_size=config.image_size, count=config.num_visualize)
    for key in ("features", "masks", "cluster_maps"):
        results.pop(key)
    return results
