"""Fully unsupervised VOC segmentation: cluster-based foreground extraction (CBFE) + community detection (CD).

Leopart's ``fully_unsup_seg.py`` as NeCo runs it (vpariza/NeCo ``experiments/fully_unsup_seg/fully_unsup_seg.py``
and ``experiments/utils.py``; docs/evaluation.md):
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
5. CD (``community``, ``cd_search``): co-occurrence graph over train + val maps, Infomap runs; val maps
   merged by module and scored by Hungarian mIoU over 21 classes at 100x100 (void ignored; segment ids
   0-20 matched, as the original's ``PredsmIoU``, see ``cd_search.segment_miou``), mean and std over runs.
   The "CBFE only" score (K=20 foreground clusters, 5 seeds) is reported as well.
   (k_community, markov_time, weight_threshold) are searched as NeCo does (Optuna TPE, seed 1000, 300
   trials on train, ``cd_search``), taken from Leopart's published values, or given.

Switches that reproduce the original where the default differs: ``attention_dir`` reads the original's
precomputed ``attn_train.pt`` / ``attn_val.pt`` masks instead of the evaluated model's attention;
``compute_upper_bound`` scores the fine clusters matched many-to-one; the config's ``registers=False``
builds the model without register tokens (``features.without_registers``).

Differences from the reference: docs/evaluation.md lists them (where it stops at an assertion, this
carries on, scores and records it; where it would search for hours and drop every trial, this stops first).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import ml_collections
import numpy as np

from evaluation import cd_search
from evaluation.datasets import DATASETS, VOC_CLASSES
from evaluation.features import iterate_batches, nearest_indices, nearest_resize, resize_image
from evaluation.job_inputs import make_extractor, open_split
from evaluation.kmeans import kmeans
from evaluation.metrics import confusion_matrix, miou
from evaluation.pca import standardize_and_project
from evaluation.plots import save_search_history
from evaluation.settings import from_config, top_level
from evaluation.visualize import label_colors, save_segmentation_panels
from neco_jax.convert import torch_io
from neco_jax.errors import ConfigError, DatasetError
from neco_jax.fg_mask import attention_fg_mask

VOC = DATASETS["voc"]  # the protocol is defined on Pascal VOC only


@dataclasses.dataclass(frozen=True)
class CbfeSettings:
    """The protocol's knobs; the defaults are NeCo's ``experiments/fully_unsup_seg/fully_unsup_seg.py`` values.

    The job config's ``config.cbfe`` is built from these defaults, except the fields of ``TOP_LEVEL``, which
    the config keeps at its top level (see ``evaluation.settings``).
    """

    # Input size of the backbone, and the evaluation size of cluster maps, masks and ground truth.
    image_size: int = 448
    eval_size: int = 100
    # Images per feature-extraction batch and decoding threads.
    batch_size: int = 64
    num_threads: int = 8
    # Standardise + PCA to pca_dim over train + val (faiss PCAMatrix subsample: pca_max_points_per_dim * D vectors).
    pca_dim: int = 50
    pca_max_points_per_dim: int = 1000
    # Noisy foreground from the last block's CLS attention: share of attention mass kept, GaussianBlur size/sigma,
    # and the smallest 8-connected component kept (smaller ones are removed; the reference drops <= 2 patches).
    attention_keep: float = 0.65
    blur_size: int = 7
    blur_sigma: float = 0.6
    min_component: int = 3
    # CBFE: spherical k-means clusters.
    k_fg: int = 200
    # k-means (faiss defaults of the reference): Lloyd iterations, restarts, training subsample per centroid, seed.
    kmeans_iters: int = 100
    kmeans_restarts: int = 5
    max_points_per_centroid: int = 256
    seed: int = 0
    # The background cut tries the lowest cut_range share of clusters.
    cut_range: tuple[float, float] = (0.55, 0.75)
    # Community detection: foreground clusters, Infomap Markov time, edge weight threshold. All three 0 (default):
    # found by NeCo's search (below). All three given: used as they are. Or cd_preset="leopart_vits16" (149, 2, 0.09)
    # / "leopart_vitb8" (109, 0.4, 0.07): Leopart's published values (MkuuWaUjinga/leopart README).
    k_community: int = 0
    markov_time: float = 0.0
    weight_threshold: float = 0.0
    cd_preset: str = ""
    # The search (evaluation.cd_search): Optuna TPE with this seed and number of trials, maximising the mean CD
    # mIoU on train; ranges (low, high, step) as NeCo's script.
    search_trials: int = cd_search.SEARCH_TRIALS
    search_seed: int = cd_search.SEARCH_SEED
    search_weight_threshold: tuple[float, float, float] = cd_search.SEARCH_SPACE["weight_threshold"]
    search_markov_time: tuple[float, float, float] = cd_search.SEARCH_SPACE["markov_time"]
    search_k: tuple[int, int, int] = cd_search.SEARCH_SPACE["k_community"]
    # Folder with the original's precomputed noisy masks attn_train.pt / attn_val.pt ("" = the evaluated model's
    # own CLS attention), to reproduce the original where it differs from the default.
    attention_dir: str = ""
    # Also report the original's compute_upper_bound (fine clusters matched many-to-one by precision).
    compute_upper_bound: bool = False
    # Infomap runs (results averaged) and its preferred number of modules (VOC object classes).
    num_runs: int = 10
    num_objects: int = 20
    # How the reported val scores match merged segments to the 21 classes: "original" (NeCo's PredsmIoU: segment
    # ids 0-20 matched, id 21 read as background) or "all_modules" (every segment competes for a class;
    # cd_search.segment_miou says why it differs). The search's objective is always the original's.
    cd_matching: str = "original"
    # Also score CBFE alone (num_objects foreground clusters, cbfe_seeds k-means seeds, Hungarian), as NeCo does.
    evaluate_cbfe: bool = True
    cbfe_seeds: int = 5
    # How many (image, ground truth, segments, overlay) examples are returned for pictures.
    num_visualize: int = 0


# Settings fields the job config keeps at its top level, shared with the other protocols (field -> config key).
TOP_LEVEL = {
    "image_size": "image_size",
    "eval_size": "mask_size",
    "batch_size": "batch_size",
    "num_threads": "num_threads",
    "num_visualize": "num_visualize",
}


# ----------------------------------------------------------------------------- noisy foreground from attention


def noisy_foreground(attention: np.ndarray, settings: CbfeSettings, chunk: int = 16) -> np.ndarray:
    """Binary (N, h, w) foreground of CLS attention (N, heads, h, w), as Leopart's ``process_attentions``.

    The training's implementation (``neco_jax.fg_mask.attention_fg_mask``) with the settings' mass kept, blur and
    smallest component, run on ``chunk`` images at a time (the last chunk padded, so it compiles once; its
    component sizes take (h*w)^2 memory per image).
    """
    n, heads, h, w = attention.shape
    fn = jax.jit(
        functools.partial(
            attention_fg_mask,
            grid=(h, w),
            threshold=settings.attention_keep,
            blur_size=settings.blur_size,
            blur_sigma=settings.blur_sigma,
            min_component=settings.min_component,
        )
    )
    flat = np.asarray(attention, np.float32).reshape(n, heads, h * w)
    size = min(chunk, n)
    masks = []
    for start in range(0, n, size):
        part = flat[start : start + size]
        padded = np.pad(part, ((0, size - len(part)), (0, 0), (0, 0)), mode="edge")
        masks.append(np.asarray(fn(padded))[: len(part)] > 0)
    return np.concatenate(masks)


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
    clusters: np.ndarray, gt: np.ndarray, precisions: np.ndarray, cut_range: tuple[float, float]
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
        raise ConfigError(f"k_fg={k} leaves no background cut in {cut_range}; use more clusters")
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
        raise ConfigError(
            f"only {len(points)} foreground pixels for {k} clusters; lower k_community or check the masks"
        )
    result = kmeans(
        points,
        k,
        iters=settings.kmeans_iters,
        restarts=settings.kmeans_restarts,
        seed=seed,
        max_points_per_centroid=settings.max_points_per_centroid,
    )
    maps = np.full((n, e, e), k, np.int64)
    maps[img, r, c] = result.labels
    return maps


# ----------------------------------------------------------------------------- the protocol


def read_attention_file(path: Path, count: int) -> np.ndarray:
    """Binary (N, s, s) noisy foreground masks of the reference's ``attn_<split>.pt`` (a torch tensor (N, 1, s, s)
    of 0/1 floats, as ``experiments/utils.py::process_and_store_attentions`` writes it)."""
    if not path.is_file():
        raise DatasetError(f"attention file {path} does not exist; put attn_train.pt and attn_val.pt in that folder")
    masks = torch_io.load_pickled(path)  # the one allow-listed unpickler of every PyTorch file
    masks = np.asarray(masks.float().numpy()) if hasattr(masks, "numpy") else None
    if masks is None or masks.ndim not in (3, 4) or (masks.ndim == 4 and masks.shape[1] != 1):
        raise DatasetError(f"{path} must hold one tensor of shape (N, 1, s, s) or (N, s, s)")
    masks = masks.reshape(masks.shape[0], *masks.shape[-2:])
    if len(masks) != count:
        raise DatasetError(
            f"{path} holds {len(masks)} masks but the split has {count} images; use the split's own file"
        )
    return masks > 0.5


def _extract(dataset, features_fn, s: CbfeSettings, desc: str):
    feats, attn, masks = [], [], []
    for batch in iterate_batches(
        dataset,
        batch_size=s.batch_size,
        image_size=s.image_size,
        mask_size=s.eval_size,
        num_threads=s.num_threads,
        desc=desc,
    ):
        out = features_fn(batch.images)
        f, a = out if isinstance(out, tuple) else (out, None)
        feats.append(np.asarray(f, np.float32))
        if a is not None:
            attn.append(np.asarray(a, np.float32))
        masks.append(batch.masks)
    return np.concatenate(feats), (np.concatenate(attn) if attn else None), np.concatenate(masks)


def noisy_masks(s: CbfeSettings, train_attn, val_attn, n_train: int, n_val: int) -> tuple[np.ndarray, str]:
    """Noisy foreground masks of train + val at the evaluation size, and where they came from."""
    if s.attention_dir:
        folder = Path(s.attention_dir)
        counts = {"train": n_train, "val": n_val}
        parts = [read_attention_file(folder / f"attn_{split}.pt", n) for split, n in counts.items()]
        return np.concatenate([nearest_resize(p, s.eval_size) for p in parts]), f"files in {folder}"
    if train_attn is None:
        raise ConfigError("the feature function returned no attention; give attention files with cbfe.attention_dir")
    noisy = noisy_foreground(np.concatenate([train_attn, val_attn]), s)
    return nearest_resize(noisy, s.eval_size), "the evaluated model's CLS attention"


def cd_parameters(s: CbfeSettings) -> tuple[tuple[int, float, float] | None, str]:
    """(k_community, markov_time, weight_threshold) and their source; None when they are to be searched."""
    given = (s.k_community, s.markov_time, s.weight_threshold)
    if s.cd_preset:
        if s.cd_preset not in cd_search.LEOPART_VALUES:
            raise ConfigError(f"cd_preset={s.cd_preset!r}; use one of {', '.join(cd_search.LEOPART_VALUES)} or ''")
        if any(given):
            raise ConfigError("give either cd_preset or k_community/markov_time/weight_threshold, not both")
        return cd_search.LEOPART_VALUES[s.cd_preset], f"Leopart README ({s.cd_preset})"
    if all(given):
        if not 1 <= s.k_community <= 255:
            raise ConfigError(f"k_community={s.k_community}: the co-occurrence graph supports 1 to 255 clusters")
        return given, "given"
    if any(given):
        raise ConfigError(
            "set all three of k_community, markov_time and weight_threshold (or none of them, to search them)"
        )
    return None, "found by search"


def check_settings(s: CbfeSettings) -> tuple[tuple[int, float, float] | None, str, dict | None]:
    """``cd_parameters`` and, when the values are searched, the search space; ``ConfigError`` for a bad setting."""
    if s.cd_matching not in cd_search.MODULE_MATCHING:
        raise ConfigError(f"cd_matching={s.cd_matching!r}; use one of {', '.join(cd_search.MODULE_MATCHING)}")
    fixed, source = cd_parameters(s)
    return fixed, source, (_search_space(s) if fixed is None else None)


def _search_space(s: CbfeSettings) -> dict:
    space = {
        "weight_threshold": tuple(float(v) for v in s.search_weight_threshold),
        "markov_time": tuple(float(v) for v in s.search_markov_time),
        "k_community": tuple(int(v) for v in s.search_k),
    }
    for name, (low, high, step) in space.items():
        if not 0 < low <= high or step <= 0:
            raise ConfigError(f"search range of {name} is {(low, high, step)}; need 0 < low <= high and step > 0")
    if space["k_community"][1] > 255:
        raise ConfigError(f"search_k goes up to {space['k_community'][1]}; the co-occurrence graph supports 255")
    if s.search_trials < 1:
        raise ConfigError(f"search_trials={s.search_trials}; the search needs at least one trial")
    return space


def evaluate_unsupervised(train_dataset, val_dataset, features_fn, *, settings: CbfeSettings = CbfeSettings()) -> dict:
    """CBFE + CD on VOC ``train`` / ``val``; ``features_fn(images)`` -> (patch tokens (B, h, w, D),
    CLS attention (B, heads, h, w)) or the tokens alone when ``attention_dir`` supplies the masks.
    Returns the scores, the CD hyper-parameters with their source (and the search's trials when searched),
    and up to ``num_visualize`` val examples."""
    s = settings
    fixed, source, space = check_settings(s)
    train_feats, train_attn, train_gt = _extract(train_dataset, features_fn, s, "CBFE train features")
    val_feats, val_attn, val_gt = _extract(val_dataset, features_fn, s, "CBFE val features")
    n_train = len(train_feats)
    all_feats = np.concatenate([train_feats, val_feats])
    n, h, w, d = all_feats.shape
    pca = np.asarray(
        standardize_and_project(all_feats.reshape(-1, d), s.pca_dim, max_points_per_dim=s.pca_max_points_per_dim)
    ).reshape(n, h, w, -1)

    noisy, noisy_source = noisy_masks(s, train_attn, val_attn, n_train, len(val_feats))
    coarse = kmeans(
        pca.reshape(-1, pca.shape[-1]),
        s.k_fg,
        iters=s.kmeans_iters,
        restarts=s.kmeans_restarts,
        seed=s.seed,
        max_points_per_centroid=s.max_points_per_centroid,
        spherical=True,
    ).labels.reshape(n, h, w)
    coarse = nearest_resize(coarse, s.eval_size)

    train_precisions = cluster_precisions(coarse[:n_train], noisy[:n_train], s.k_fg)
    threshold, cuts = choose_threshold(coarse[:n_train], train_gt, train_precisions, s.cut_range)
    val_precisions = cluster_precisions(coarse[n_train:], noisy[n_train:], s.k_fg)
    foreground = np.concatenate(
        [
            foreground_from_threshold(coarse[:n_train], train_precisions, threshold),
            foreground_from_threshold(coarse[n_train:], val_precisions, threshold),
        ]
    )

    if fixed is None:  # before any further clustering: can these masks hold the search's clusters at all?
        cd_search.check_support(foreground, n_train, (h, w), max(cd_search.grid(*space["k_community"])))

    results = {
        "threshold": round(threshold, 2),  # a multiple of 0.05 (np.arange's value, e.g. 0.9500000000000001)
        "fg_iou_train": foreground_jaccard(train_gt, foreground[:n_train]),
        "fg_iou_val": foreground_jaccard(val_gt, foreground[n_train:]),
        "noisy_masks": noisy_source,
        "cuts": [{"start": a, "precision": b, "fg_iou": c} for a, b, c in cuts],
    }
    if s.evaluate_cbfe:
        scores = []
        for seed in range(s.cbfe_seeds):
            maps = cluster_foreground(pca, foreground, s.num_objects, seed=seed, settings=s)
            scores.append(
                miou(
                    maps[n_train:],
                    val_gt,
                    num_classes=VOC.num_classes,
                    ignore_index=VOC.ignore_index,
                    matching="hungarian",
                )[0]
            )
        results["miou_cbfe"] = float(np.mean(scores))

    def inputs_for(k: int) -> cd_search.CommunityInputs:
        maps = cluster_foreground(pca, foreground, k, seed=s.seed, settings=s)
        return cd_search.community_inputs(maps, n_train, train_gt, val_gt, k)

    if fixed is None:
        found, cache = _search(inputs_for, space, s, points=int(foreground.sum()))
        results["search"] = found
        best = found["best"]
        k, markov_time, weight_threshold = best["k_community"], best["markov_time"], best["weight_threshold"]
        inputs = cache[k]
    else:
        k, markov_time, weight_threshold = fixed
        inputs = inputs_for(k)
    results["cd_params"] = {
        "k_community": k,
        "markov_time": markov_time,
        "weight_threshold": weight_threshold,
        "source": source,
    }
    if s.compute_upper_bound:
        results["miou_upper_bound"] = cd_search.upper_bound(inputs)

    edges, lookups = cd_search.run_communities(
        inputs,
        markov_time=markov_time,
        weight_threshold=weight_threshold,
        num_runs=s.num_runs,
        preferred_modules=s.num_objects,
    )
    scored = cd_search.val_scores(inputs, lookups, s.cd_matching)
    runs = [
        {"run": r, "miou": score, "segments": segments, "original_stops": stops}
        for r, (score, _, segments, stops) in enumerate(scored)
    ]
    best = int(np.argmax([row["miou"] for row in runs]))
    scores = [row["miou"] for row in runs]
    results.update(
        miou=float(np.mean(scores)),
        miou_std=float(np.std(scores)),
        per_class_iou=scored[best][1].tolist(),
        runs=runs,
        edges=len(edges),
        cd_matching=s.cd_matching,
        clusters_in_both_splits=inputs.complete,  # the original asserts it before building the graph
    )
    merged = lookups[best][inputs.maps[n_train:]]
    results["examples"] = _examples(val_dataset, val_gt, merged, s)
    return results


def _search(inputs_for, space: dict, s: CbfeSettings, *, points: int) -> tuple[dict, dict]:
    """NeCo's search of the CD values: the once-per-k inputs (``inputs_for(k)``, largest k first, with an estimate
    of the time left), then the trials. Returns the search's record and the inputs per k."""

    def objective_on(inputs, markov_time, weight_threshold):
        return cd_search.train_objective(
            inputs,
            markov_time=markov_time,
            weight_threshold=weight_threshold,
            num_runs=s.num_runs,
            preferred_modules=s.num_objects,
        )

    def weight(k: int) -> float:
        """Relative cost of k: the k-means' iterations over min(points, 256 k) training points, then all points."""
        train = min(points, s.max_points_per_centroid * k) if s.max_points_per_centroid else points
        return k * (s.kmeans_iters * s.kmeans_restarts * train + points)

    middle = {name: values[len(values) // 2] for name in space for values in [cd_search.grid(*space[name])]}
    cache = cd_search.per_k_inputs(
        inputs_for,
        cd_search.grid(*space["k_community"]),
        weight=weight,
        trial=lambda inputs: objective_on(inputs, middle["markov_time"], middle["weight_threshold"]),
        trials=s.search_trials,
    )
    found = cd_search.search(
        lambda k, markov_time, weight_threshold: objective_on(cache[k], markov_time, weight_threshold),
        trials=s.search_trials,
        seed=s.search_seed,
        space=space,
    )
    return found, cache


def _examples(dataset, gt: np.ndarray, segments: np.ndarray, s: CbfeSettings) -> list:
    """(image, ground truth, segments as the score reads them, overlay) for the first ``num_visualize`` val images."""
    if not s.num_visualize:
        return []

    n = VOC.num_classes
    conf = confusion_matrix(
        segments, gt, num_classes=n, num_pred=max(n, int(segments.max()) + 1), ignore_index=VOC.ignore_index
    )
    as_classes = cd_search.segment_classes(conf, s.cd_matching)[segments]
    examples = []
    for i in range(min(s.num_visualize, len(gt))):
        image = resize_image(dataset.image(i), s.image_size)
        big = nearest_resize(as_classes[i], s.image_size)
        overlay = np.where((big > 0)[..., None], 0.45 * image + 0.55 * label_colors(big), image)
        examples.append((image, gt[i], as_classes[i], overlay.astype(np.uint8)))
    return examples


def settings_from_config(config: ml_collections.ConfigDict) -> CbfeSettings:
    return from_config(CbfeSettings, config.cbfe, **top_level(config, TOP_LEVEL))


def run(config: ml_collections.ConfigDict, model=None) -> dict:
    """The protocol entry of ``python -m evaluation`` (see configs/eval/voc_cbfe.py)."""
    if config.dataset != "voc":
        raise ConfigError(f"CBFE + CD is defined on Pascal VOC only, not {config.dataset!r}")
    settings = settings_from_config(config)
    check_settings(settings)  # a bad setting fails before any feature is computed
    extractor = make_extractor(config, model, registers=config.cbfe.registers)
    train = open_split(config, config.train_split)
    val = open_split(config, config.val_split)
    features_fn = extractor if settings.attention_dir else extractor.with_attention
    results = evaluate_unsupervised(train, val, features_fn, settings=settings)
    examples = results.pop("examples")
    folder = Path(config.workdir) / "cbfe"
    if examples:
        save_segmentation_panels(
            examples,
            folder,
            num_classes=VOC.num_classes,
            titles=["image", "ground truth", "CBFE + CD (matched)", "overlay"],
        )
    if "search" in results:
        save_search_history(results["search"], folder / "search_history.png")
    return {**results, "class_names": list(VOC_CLASSES)}
