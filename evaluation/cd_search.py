"""Community-detection (CD) hyper-parameters of CBFE + CD: trials scored cheaply, and the Optuna search that picks them.

NeCo's ``experiments/fully_unsup_seg/fully_unsup_seg.py`` (``find_hyperparams``) finds (k_community,
markov_time, weight_threshold) per model with Optuna's TPE sampler (seed 1000, 300 trials), maximising the
mean CD mIoU on the VOC *train* split over the Infomap runs; trials that trip one of the reference's
assertions (a fine cluster missing from a split, more than 21 merged segments) are dropped. Leopart's
README instead publishes fixed values per backbone (``LEOPART_VALUES``).

What does not depend on a trial is computed once per k (``community_inputs``): the foreground k-means maps,
the co-occurrence graph's weights and each split's (classes x clusters) confusion matrix. A trial is then
only edge thresholding, Infomap runs on at most 250 nodes and merging confusion-matrix columns by module
(the same counts as relabelling every pixel, without touching a pixel).

Differences from the reference: trials run one after another (the reference used ``n_jobs=5`` threads,
whose completion order, and so TPE's history, is not reproducible); Infomap seeds are shifted by one
(see ``community``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np
from tqdm import tqdm

from evaluation import community
from evaluation.datasets import DATASETS
from evaluation.features import nearest_indices
from evaluation.metrics import confusion_matrix, match_clusters, miou_from_confusion, miou_from_mapping
from neco_jax.errors import ConfigError

# Search space in the order the reference suggests the parameters (TPE's draws depend on it):
# name -> (low, high, step). NeCo widened Leopart's k range [99, 249] to [69, 249].
SEARCH_SPACE = {
    "weight_threshold": (0.01, 0.1, 0.01),
    "markov_time": (0.1, 2.0, 0.1),
    "k_community": (69, 249, 10),
}
SEARCH_SEED = 1000
SEARCH_TRIALS = 300

# How merged segments are matched to classes in the reported scores (see ``segment_miou``).
MODULE_MATCHING = ("original", "all_modules")

# Leopart README (MkuuWaUjinga/leopart, "Fully unsupervised semantic segmentation"): (k, Markov time, threshold).
LEOPART_VALUES = {
    "leopart_vits16": (149, 2.0, 0.09),
    "leopart_vitb8": (109, 0.4, 0.07),
}


class InvalidTrial(Exception):
    """A trial the reference drops: one of its assertions (caught by ``study.optimize(catch=...)``) fails."""


@dataclasses.dataclass(frozen=True)
class CommunityInputs:
    """Everything a CD trial at one k needs: cluster maps, graph weights, and per-split confusion matrices."""

    k: int
    maps: np.ndarray  # (N, E, E) uint8: train maps then val maps; labels 0..k-1 foreground, k background
    n_train: int
    adjacency: np.ndarray  # (k + 1, k + 1) averaged co-occurrence weights over train + val
    confusion: dict  # split -> (num_classes, k + 1) int64, void pixels dropped
    present: np.ndarray  # (2, k + 1) bool: which labels occur in the train maps, and in the val maps

    @property
    def complete(self) -> bool:
        """Every label occurs in both splits (the reference asserts it before building the graph)."""
        return bool(self.present.all())


def community_inputs(
    maps: np.ndarray,
    n_train: int,
    gt_train: np.ndarray,
    gt_val: np.ndarray,
    k: int,
    *,
    num_classes: int = DATASETS["voc"].num_classes,
    ignore_index: int = DATASETS["voc"].ignore_index,
) -> CommunityInputs:
    """The trial-independent work at one k, from the (N, E, E) foreground-cluster maps of train then val."""
    labels = k + 1
    present = np.stack(
        [np.bincount(part.ravel(), minlength=labels)[:labels] > 0 for part in (maps[:n_train], maps[n_train:])]
    )
    confusion = {
        split: confusion_matrix(part, gt, num_classes=num_classes, num_pred=labels, ignore_index=ignore_index)
        for split, part, gt in (("train", maps[:n_train], gt_train), ("val", maps[n_train:], gt_val))
    }
    return CommunityInputs(
        k=k,
        maps=maps.astype(np.uint8),
        n_train=n_train,
        adjacency=community.cooccurrence_matrix(maps, labels),
        confusion=confusion,
        present=present,
    )


def merged_confusion(conf: np.ndarray, lookup: np.ndarray) -> np.ndarray:
    """(classes, segments) counts after relabelling cluster k as segment lookup[k] (at least `classes` columns)."""
    merged = np.zeros((conf.shape[0], max(int(lookup.max(initial=0)) + 1, conf.shape[0])), np.int64)
    np.add.at(merged.T, lookup, conf.T)
    return merged


def reference_asserts(conf: np.ndarray) -> bool:
    """Whether NeCo's ``PredsmIoU(C, C).compute`` stops at its assertions on these (C, segments) counts: more than
    C distinct segment ids among the scored pixels, or an id above C."""
    ids = np.flatnonzero(conf.sum(axis=0))
    return bool(len(ids) > conf.shape[0] or (len(ids) and ids.max() > conf.shape[0]))


def segment_classes(conf: np.ndarray, matching: str = "original") -> np.ndarray:
    """(segments,) the class each merged segment id reads as, given the (C classes, segments) counts.

    "original": NeCo's ``PredsmIoU(C, C).compute(many_to_one=False)`` (``experiments/utils.py``: its score matrix
    covers prediction ids 0..C-1, ``_hungarian_match`` pairs them with the classes, and the reordered map starts
    from zeros). Segment ids C and above are never matched and read as class 0. When Infomap finds exactly C
    modules, numbered 1..C, module C thus counts as background.
    "all_modules": Hungarian matching over every segment id, unmatched ones read as class 0. It differs from the
    original because Infomap's module numbering is arbitrary: the module that happens to get id C competes for a
    class like the others instead of being background, and more than C modules are scored where the original
    stops at an assertion.
    """
    if matching == "all_modules":
        return match_clusters(conf, "hungarian")
    if matching != "original":
        raise ValueError(f"unknown module matching {matching!r}; use one of {MODULE_MATCHING}")
    num_classes, segments = conf.shape
    head = np.pad(conf[:, :num_classes], ((0, 0), (0, max(0, num_classes - segments))))
    mapping = np.zeros(segments, np.int64)  # ids >= C: class 0
    mapping[: min(num_classes, segments)] = match_clusters(head, "hungarian")[:segments]
    return mapping


def segment_miou(conf: np.ndarray, matching: str = "original") -> tuple[float, np.ndarray]:
    """(mIoU, per-class IoU) of merged segments given their (C classes, segments) counts, read as
    ``segment_classes`` matches them."""
    return miou_from_mapping(conf, segment_classes(conf, matching))


def reference_cd_miou(conf: np.ndarray) -> tuple[float, np.ndarray]:
    """The search's score of a run, as NeCo computes it: ``segment_miou(conf, "original")``, and ``InvalidTrial``
    where its assertions stop it (the search drops the trial, as ``catch=(AssertionError,)``)."""
    if reference_asserts(conf):
        ids = np.flatnonzero(conf.sum(axis=0))
        raise InvalidTrial(f"{len(ids)} segments with ids up to {ids.max()} for {conf.shape[0]} classes")
    return segment_miou(conf, "original")


def run_communities(
    inputs: CommunityInputs, *, markov_time: float, weight_threshold: float, num_runs: int, preferred_modules: int
) -> tuple[list[tuple[int, int, float]], list[np.ndarray]]:
    """The graph's edges and, for each Infomap run r (seed r + 1), the merge lookup of the k + 1 labels."""
    edges = community.graph_edges(inputs.adjacency, weight_threshold)
    lookups = []
    for r in range(num_runs):
        modules = community.detect_communities(
            edges, markov_time=markov_time, seed=r + 1, preferred_modules=preferred_modules
        )
        lookups.append(community.merge_lookup(modules, inputs.k + 1))
    return edges, lookups


def train_objective(
    inputs: CommunityInputs, *, markov_time: float, weight_threshold: float, num_runs: int, preferred_modules: int
) -> float:
    """The search's objective: mean reference CD mIoU on train over the runs; ``InvalidTrial`` where the
    reference asserts (a label missing from a split, too many segments in any run)."""
    if not inputs.complete:
        raise InvalidTrial(f"k_community={inputs.k}: a foreground cluster is missing from the train or val maps")
    _, lookups = run_communities(
        inputs,
        markov_time=markov_time,
        weight_threshold=weight_threshold,
        num_runs=num_runs,
        preferred_modules=preferred_modules,
    )
    return float(np.mean([reference_cd_miou(merged_confusion(inputs.confusion["train"], lu))[0] for lu in lookups]))


def val_scores(
    inputs: CommunityInputs, lookups: list[np.ndarray], matching: str = "original"
) -> list[tuple[float, np.ndarray, int, bool]]:
    """(mIoU, per-class IoU, segments, whether the original's assertions stop it) of each run on val, scored with
    ``segment_miou``'s ``matching``. Unlike the search objective this never drops a run: where NeCo stops at an
    assertion, the run is scored with the same rule and flagged."""
    present = inputs.present[1]
    out = []
    for lookup in lookups:
        conf = merged_confusion(inputs.confusion["val"], lookup)
        score, per_class = segment_miou(conf, matching)
        out.append((score, per_class, int(len(np.unique(lookup[present]))), reference_asserts(conf)))
    return out


def upper_bound(inputs: CommunityInputs) -> float:
    """The reference's ``compute_upper_bound``: the val foreground clusters (k + 1 labels) matched many-to-one
    to the class each is most precise for, an ideal merging (by precision, so not a strict bound on mIoU)."""
    return miou_from_confusion(inputs.confusion["val"], "precision")[0]


def check_support(foreground: np.ndarray, n_train: int, grid_shape: tuple[int, int], k_max: int) -> None:
    """``ConfigError`` when the data cannot hold ``k_max`` foreground clusters in both splits, before any per-k work.

    NeCo drops every trial whose k has a fine cluster missing from the train or the val maps. The clusters are
    made of foreground pixels nearest-upsampled from the patch grid, so each split needs at least ``k_max``
    distinct foreground patches (and some background) for its search range to be usable at all.
    """
    rows = nearest_indices(grid_shape[0], foreground.shape[1])
    cols = nearest_indices(grid_shape[1], foreground.shape[2])
    for split, part in (("train", foreground[:n_train]), ("val", foreground[n_train:])):
        img, r, c = np.nonzero(part)
        patches = len(np.unique((img * grid_shape[0] + rows[r]) * grid_shape[1] + cols[c]))
        if patches < k_max or part.all():
            raise ConfigError(
                f"the CD search's largest k_community is {k_max}, but the {split} split's {len(part)} images hold "
                f"{patches} foreground patches{'' if patches < k_max else ' and no background'}, so every trial "
                f"there would be dropped; {_SMALLER}"
            )


# What to do when the data cannot support the search range (the end of a one-line error).
_SMALLER = (
    "use fixed values (cbfe.cd_preset=leopart_vits16, or cbfe.k_community, markov_time and weight_threshold) or "
    "search smaller k (cbfe.search_k=(low, high, step))"
)


def per_k_inputs(
    make: Callable[[int], CommunityInputs],
    ks: list[int],
    *,
    weight: Callable[[int], float],
    trial: Callable[[CommunityInputs], float],
    trials: int,
    progress: bool = True,
) -> dict[int, CommunityInputs]:
    """``make(k)`` for every k, the smallest first, with a bar that estimates the time left for the whole search.

    The smallest k is the cheapest and the likeliest to keep every cluster label in both splits (its clusters are
    the largest): when it does not, no k of the range will, and this stops with ``ConfigError`` after that one k.
    At larger k, trials whose k misses a label are dropped later, as the reference drops them. The time left is
    the per-k work still to do, at the seconds per unit of ``weight(k)`` measured so far, plus ``trials`` trials
    at the seconds of one ``trial`` on the first k's inputs, scaled by the mean k over that k (a trial's graph
    and confusion matrices grow with k).
    """
    order = sorted(ks)
    cache: dict[int, CommunityInputs] = {}
    done_weight = spent = 0.0
    trials_s = 0.0
    bar = tqdm(total=len(order), desc="CD inputs per k", unit="k", disable=not progress, bar_format=_BAR)
    for k in order:
        start = time.perf_counter()
        inputs = make(k)
        spent += time.perf_counter() - start
        done_weight += weight(k)
        cache[k] = inputs
        if len(cache) == 1:
            if not inputs.complete:
                bar.close()
                missing = int((~inputs.present).any(axis=0).sum())
                raise ConfigError(
                    f"at k_community={k}, the smallest k of the search, {missing} of the {k + 1} cluster labels are "
                    f"missing from the train or val maps, so every trial would be dropped; {_SMALLER}"
                )
            start = time.perf_counter()
            try:
                trial(inputs)
            except InvalidTrial:
                pass
            trials_s = trials * (time.perf_counter() - start) * float(np.mean(order)) / k
        left = spent / done_weight * sum(weight(j) for j in order if j not in cache) + trials_s
        incomplete = sum(not c.complete for c in cache.values())
        bar.set_postfix_str(f"k={k}, {incomplete} k missing a label, whole search left ~{_duration(left)}")
        bar.update()
    bar.close()
    return cache


_BAR = "{desc}: {n_fmt}/{total_fmt} {unit} |{bar}| {elapsed} elapsed{postfix}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")


def grid(low: float, high: float, step: float) -> list:
    """The values Optuna's stepped suggestion can return: low, low + step, ... up to high."""
    count = int(np.floor((high - low) / step + 1e-9)) + 1
    if isinstance(low, int) and isinstance(step, int):
        return [low + i * step for i in range(count)]
    return [round(low + i * step, 10) for i in range(count)]


def search(
    objective: Callable[[int, float, float], float],
    *,
    trials: int = SEARCH_TRIALS,
    seed: int = SEARCH_SEED,
    space: dict | None = None,
    progress: bool = True,
) -> dict:
    """Maximise ``objective(k_community, markov_time, weight_threshold)`` with Optuna TPE (the reference's
    sampler, seed and suggestion order); trials raising ``InvalidTrial`` are dropped as the reference's
    ``catch=(AssertionError,)`` does. Returns the best values and one row per trial."""
    import optuna  # the optional eval extra, and a slow import: only when a search runs

    space = dict(SEARCH_SPACE if space is None else space)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # dropped trials are in the table, not logged one by one
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    seconds = {}

    def wrapped(trial):
        values = {}
        for name, (low, high, step) in space.items():  # the reference's order: threshold, Markov time, k
            if name == "k_community":
                values[name] = trial.suggest_int(name, int(low), int(high), step=int(step))
            else:
                values[name] = trial.suggest_float(name, float(low), float(high), step=float(step))
        start = time.perf_counter()
        try:
            return objective(values["k_community"], values["markov_time"], values["weight_threshold"])
        finally:
            seconds[trial.number] = time.perf_counter() - start

    study.optimize(wrapped, n_trials=trials, catch=(InvalidTrial,), show_progress_bar=progress)
    rows = []
    for t in study.trials:
        row = {"trial": t.number, **{n: _tidy(t.params.get(n)) for n in space}}
        row.update(value=t.value, state=t.state.name, seconds=round(seconds.get(t.number, 0.0), 4))
        rows.append(row)
    done = [r for r in rows if r["state"] == "COMPLETE"]
    if not done:
        raise ConfigError(
            f"all {trials} community-detection trials were dropped (a fine cluster missing from a split, or more "
            "segments than classes); widen the search ranges or fix the values with --config.cbfe.k_community=..."
        )
    best = study.best_trial
    return {
        "best": {n: _tidy(best.params[n]) for n in space},
        "best_value": float(best.value),
        "best_trial": best.number,
        "trials": rows,
        "completed": len(done),
        "sampler": f"optuna {optuna.__version__} TPESampler(seed={seed})",
        "space": {n: list(v) for n, v in space.items()},
        "median_trial_seconds": float(np.median([r["seconds"] for r in done])),
    }


def _tidy(value):
    return round(value, 10) if isinstance(value, float) else value
