"""CBFE + CD pieces against restatements of Leopart's code (torch / loops), and a tiny end-to-end run."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from eval_fixtures import NUM_CLASSES, make_voc_dataset, oracle_features, pixel_classes
from skimage.measure import label as sk_label
from torchvision.transforms import GaussianBlur

from evaluation import cbfe, cd_search, community, datasets
from evaluation.features import nearest_resize
from evaluation.kmeans import kmeans
from neco_jax import errors


def reference_process_attentions(attn, keep=0.65, sigma=0.6):
    """Leopart's process_attentions on head-averaged maps (N, S, S), in torch."""
    n, s, _ = attn.shape
    a = GaussianBlur(7, sigma=sigma)(torch.from_numpy(attn)[:, None]).reshape(n, 1, s * s)
    val, idx = torch.sort(a)
    val /= torch.sum(val, dim=-1, keepdim=True)
    th = torch.cumsum(val, dim=-1) > (1 - keep)
    th[:, 0] = torch.gather(th[:, 0], dim=1, index=torch.argsort(idx)[:, 0])
    th = th.reshape(n, 1, s, s).float()
    for j in range(n):
        labelled = sk_label(th[j].numpy())
        for k in range(1, labelled.max() + 1):
            if (labelled == k).sum() <= 2:
                th[j, 0][torch.from_numpy(labelled[0] == k)] = 0
    return th[:, 0].numpy().astype(bool)


def test_noisy_foreground_matches_the_reference():
    rng = np.random.default_rng(1)
    attn = rng.random((4, 3, 10, 10)).astype(np.float32) ** 4  # peaky maps: several small components
    ours = cbfe.noisy_foreground(attn, cbfe.CbfeSettings(), chunk=3)  # two chunks, the last one padded
    ref = reference_process_attentions(attn.mean(axis=1))
    np.testing.assert_array_equal(ours, ref)
    assert ours.any() and not ours.all()


def reference_precisions(clusters, mask, k):
    counts, sums = np.zeros(k), np.zeros(k)
    for c_img, m_img in zip(clusters, mask):
        for cid in np.unique(c_img):
            sel = c_img == cid
            counts[cid] += 1
            sums[cid] += (sel & m_img).sum() / max(sel.sum(), 1e-8)
    return sums / counts


def test_cluster_precisions_match_the_reference_loop():
    rng = np.random.default_rng(2)
    clusters = rng.integers(0, 7, size=(5, 6, 6))
    mask = rng.random((5, 6, 6)) < 0.4
    np.testing.assert_allclose(cbfe.cluster_precisions(clusters, mask, 7), reference_precisions(clusters, mask, 7))


def test_threshold_search_matches_the_reference_loop():
    rng = np.random.default_rng(3)
    k = 20
    clusters = rng.integers(0, k, size=(6, 10, 10))
    gt = np.where(rng.random((6, 10, 10)) < 0.5, 0, rng.integers(1, 21, size=(6, 10, 10)))
    gt[0, :2] = 255  # void counts as foreground
    precisions = rng.random(k)
    threshold, cuts = cbfe.choose_threshold(clusters, gt, precisions, cbfe.CbfeSettings().cut_range)
    # find_good_threshold + the rounding of cluster_based_fg_extraction, restated.
    jacs = []
    sorted_args, sorted_precs = np.argsort(precisions), np.sort(precisions)
    for start in range(int(0.55 * k), int(0.75 * k)):
        fg = np.isin(clusters, sorted_args[start:])
        ious = [((g != 0) & f).sum() / ((g != 0) | f).sum() for g, f in zip(gt, fg)]
        jacs.append((sorted_precs[start], start, float(np.mean(ious))))
    best = sorted(jacs, key=lambda x: x[2])[-1]
    assert threshold == min(np.arange(0, 1, 0.05), key=lambda x: abs(x - best[0]))
    assert [c[0] for c in cuts] == [j[1] for j in jacs]
    np.testing.assert_allclose([c[2] for c in cuts], [j[2] for j in jacs])
    fg = cbfe.foreground_from_threshold(clusters, precisions, threshold)
    start_idx = np.where(np.sort(precisions) >= threshold)[0][0]
    np.testing.assert_array_equal(fg, np.isin(clusters, np.argsort(precisions)[start_idx:]))


def _skimage_offset(angle, distance):
    # skimage's graycomatrix rounds half away from zero: (row, col) offset of the pair's second pixel.
    def r(v):
        return int(math.copysign(math.floor(abs(v) + 0.5), v))

    return r(math.sin(angle) * distance), r(math.cos(angle) * distance)


def test_cooccurrence_matches_brute_force_pixel_pairs():
    rng = np.random.default_rng(4)
    maps = rng.integers(0, 5, size=(3, 7, 6))
    maps[2] = 4  # a single-cluster image: no co-occurrence, does not count as an appearance
    total, appearances = np.zeros((5, 5)), np.zeros(5)
    for m in maps:
        counts = np.zeros((5, 5))
        for angle in community.ANGLES:
            for d in (1, 2):
                dr, dc = _skimage_offset(angle, d)
                for r in range(m.shape[0]):
                    for c in range(m.shape[1]):
                        if 0 <= r + dr < m.shape[0] and 0 <= c + dc < m.shape[1]:
                            counts[m[r, c], m[r + dr, c + dc]] += 1
        np.fill_diagonal(counts, 0)
        rows = counts.sum(1, keepdims=True)
        total += np.divide(counts, rows, out=np.zeros_like(counts), where=rows != 0)
        appearances += rows[:, 0] > 0
    np.testing.assert_allclose(community.cooccurrence_matrix(maps, 5), total / appearances[:, None], rtol=1e-12)


def test_cooccurrence_matches_skimage_graycomatrix():
    from skimage.feature import graycomatrix

    rng = np.random.default_rng(14)
    maps = np.repeat(np.repeat(rng.integers(0, 40, size=(5, 6, 7)), 3, axis=1), 2, axis=2)  # blocky, as upsampled maps
    total, appearances = np.zeros((40, 40)), np.zeros(40)
    for m in maps:
        counts = graycomatrix(m.astype(np.uint8), [1, 2], list(community.ANGLES), levels=40).sum(axis=(2, 3))
        counts = counts.astype(np.float64)
        np.fill_diagonal(counts, 0)
        rows = counts.sum(1, keepdims=True)
        total += np.divide(counts, rows, out=np.zeros_like(counts), where=rows != 0)
        appearances += rows[:, 0] > 0
    expected = np.divide(total, appearances[:, None], out=np.zeros_like(total), where=appearances[:, None] != 0)
    np.testing.assert_allclose(community.cooccurrence_matrix(maps, 40, chunk=2), expected, rtol=1e-12)


def test_edges_communities_and_merging():
    adjacency = np.array(
        [[0, 0.5, 0.4, 0.01], [0.3, 0, 0.6, 0.0], [0.5, 0.5, 0, 0.2], [0.02, 0.0, 0.3, 0]], dtype=np.float64
    )
    edges = community.graph_edges(adjacency, 0.05)
    assert edges == [(0, 1, 0.3), (0, 2, 0.4), (1, 2, 0.5), (2, 3, 0.2)]
    # Two 4-cliques joined by one weak edge: Infomap finds the two groups.
    strong = [(a, b, 1.0) for group in ((0, 1, 2, 3), (4, 5, 6, 7)) for a in group for b in group if a < b]
    modules = community.detect_communities(strong + [(3, 4, 0.05)], markov_time=1.0, seed=1, preferred_modules=2)
    assert len({modules[i] for i in range(4)}) == 1 and len({modules[i] for i in range(4, 8)}) == 1
    assert modules[0] != modules[4]
    merged = community.merge_lookup(modules, 9)[np.array([[0, 4, 8]])]
    np.testing.assert_array_equal(merged, [[modules[0], modules[4], 0]])  # node 8 is not in the graph


def test_spherical_kmeans_reaches_a_spherical_lloyd_fixed_point():
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(c, 0.3, size=(60, 5)) for c in rng.normal(size=(4, 5)) * 3]).astype(np.float32)
    res = kmeans(x, 4, iters=50, restarts=2, seed=0, max_points_per_centroid=0, spherical=True)
    np.testing.assert_allclose(np.linalg.norm(res.centroids, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(res.labels, np.argmax(x @ res.centroids.T, axis=1))
    for j in range(4):
        mean = x[res.labels == j].mean(0)
        np.testing.assert_allclose(res.centroids[j], mean / np.linalg.norm(mean), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- end to end


def oracle_with_attention(images, *, patch_size=14):
    """Oracle features and a CLS attention that looks at the objects (their pixel share per patch)."""
    feats = oracle_features(images, patch_size=patch_size)
    b, hh, ww, _ = images.shape
    h, w = hh // patch_size, ww // patch_size
    fg = (pixel_classes(images) != 0).astype(np.float32)[:, : h * patch_size, : w * patch_size]
    share = fg.reshape(b, h, patch_size, w, patch_size).mean(axis=(2, 4))
    attn = np.stack([share + 0.01, 0.5 * share + 0.01], axis=1)
    return feats, attn / attn.sum(axis=(2, 3), keepdims=True)


@pytest.mark.slow
def test_cbfe_and_community_detection_end_to_end(tmp_path):
    root = make_voc_dataset(tmp_path / "voc", num_train=8, num_val=6)
    train = datasets.open_dataset("voc", root, "train")
    val = datasets.open_dataset("voc", root, "val")
    settings = cbfe.CbfeSettings(
        image_size=112,
        eval_size=28,
        batch_size=4,
        num_threads=2,
        pca_dim=8,
        k_fg=24,
        kmeans_iters=20,
        kmeans_restarts=2,
        k_community=12,
        markov_time=1.0,
        weight_threshold=0.02,
        num_runs=2,
        cbfe_seeds=2,
        num_visualize=2,
    )
    out = cbfe.evaluate_unsupervised(train, val, oracle_with_attention, settings=settings)
    assert 0.0 <= out["miou"] <= 1.0 and 0.0 <= out["miou_cbfe"] <= 1.0
    assert len(out["runs"]) == 2 and len(out["per_class_iou"]) == NUM_CLASSES
    assert out["fg_iou_val"] > 0.5  # the attention points at the objects, so CBFE finds them
    assert abs(out["threshold"] / 0.05 - round(out["threshold"] / 0.05)) < 1e-9  # a multiple of 0.05
    from evaluation.visualize import save_segmentation_panels

    paths = save_segmentation_panels(out["examples"], tmp_path / "cbfe", num_classes=21)
    assert len(paths) == 2 and all(p.stat().st_size > 0 for p in paths)
    assert dataclasses.asdict(settings)["k_community"] == 12


@pytest.mark.slow
def test_cbfe_job_through_the_runner(tmp_path):
    import json

    from flax import nnx

    from configs.eval import voc_cbfe
    from evaluation.runner import run_job
    from neco_jax import save_backbone
    from neco_jax.models import VisionTransformer, get_arch

    root = make_voc_dataset(tmp_path / "voc", num_train=8, num_val=6)
    backbone = tmp_path / "vit_tiny"
    save_backbone(VisionTransformer(get_arch("vit_tiny_test"), rngs=nnx.Rngs(0)), backbone)
    config = voc_cbfe.get_config()
    config.update_from_flattened_dict(
        {
            "checkpoint": str(backbone),
            "data_dir": str(root),
            "workdir": str(tmp_path / "out"),
            "image_size": 112,
            "mask_size": 28,
            "batch_size": 4,
            "num_threads": 2,
            "num_visualize": 1,
            "cbfe.pca_dim": 8,
            "cbfe.k_fg": 24,
            "cbfe.kmeans_iters": 10,
            "cbfe.kmeans_restarts": 1,
            "cbfe.num_runs": 2,
            "cbfe.evaluate_cbfe": False,
            "cbfe.search_trials": 6,
            "cbfe.search_k": (3, 6, 3),
            "cbfe.compute_upper_bound": True,
        }
    )
    run_job(config)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert 0.0 <= saved["miou"] <= 1.0 and len(saved["runs"]) == 2
    assert (tmp_path / "out" / "cbfe" / "example_000.png").stat().st_size > 0
    search = saved["search"]
    assert len(search["trials"]) == 6 and {r["k_community"] for r in search["trials"]} <= {3, 6}
    done = [r for r in search["trials"] if r["state"] == "COMPLETE"]
    assert search["best_value"] == max(r["value"] for r in done)
    assert saved["cd_params"]["source"] == "found by search"
    assert {k: saved["cd_params"][k] for k in search["best"]} == search["best"]
    assert 0.0 < saved["miou_upper_bound"] <= 1.0
    assert search["median_trial_seconds"] < 1.0
    assert (tmp_path / "out" / "cbfe" / "search_history.png").stat().st_size > 0


# ----------------------------------------------------------------------------- CD hyper-parameters and switches


def reference_predsmiou(gt, pred, num_classes=21):
    """NeCo's ``PredsmIoU(C, C).compute(many_to_one=False)`` restated on flat pixels: its asserts, the per-pair
    IoU score matrix, Hungarian matching, unmatched ids read as 0, plain mean IoU."""
    from scipy.optimize import linear_sum_assignment

    assert len(np.unique(pred)) <= num_classes and np.max(pred) <= num_classes
    score = np.zeros((num_classes, num_classes))
    for c1 in range(num_classes):
        for c2 in range(num_classes):
            tp = np.sum((gt == c1) & (pred == c2))
            score[c1, c2] = tp / max(np.sum(gt == c1) + np.sum(pred == c2) - tp, 1e-8)
    rows, cols = linear_sum_assignment(1 - score)
    reordered = np.zeros(len(pred))
    for t, p in zip(rows, cols):
        reordered[pred == p] = t
    ious = []
    for c in range(num_classes):
        tp = np.sum((gt == c) & (reordered == c))
        ious.append(tp / max(np.sum(gt == c) + np.sum(reordered == c) - tp, 1e-8))
    return float(np.mean(ious))


def _random_cd_inputs(rng, k=30, n_train=6, n_val=5, size=12):
    maps = rng.integers(0, k + 1, size=(n_train + n_val, size, size))
    gt = rng.integers(0, 21, size=maps.shape).astype(np.uint8)
    gt[rng.random(gt.shape) < 0.1] = 255
    return cd_search.community_inputs(maps, n_train, gt[:n_train], gt[n_train:], k), maps, gt


def test_trials_in_confusion_space_equal_the_reference_on_pixels():
    rng = np.random.default_rng(20)
    inputs, maps, gt = _random_cd_inputs(rng)
    np.testing.assert_allclose(inputs.adjacency, community.cooccurrence_matrix(maps, 31))
    assert inputs.complete and inputs.maps.dtype == np.uint8
    train_maps, train_gt = maps[:6], gt[:6]
    for lookup in (rng.integers(1, 19, size=31), np.r_[np.zeros(5, int), rng.integers(1, 22, size=26)]):
        merged = lookup[train_maps]
        keep = train_gt != 255
        if len(np.unique(merged[keep])) > 21 or merged[keep].max() > 21:
            with pytest.raises(cd_search.InvalidTrial):
                cd_search.reference_cd_miou(cd_search.merged_confusion(inputs.confusion["train"], lookup))
            continue
        ours = cd_search.reference_cd_miou(cd_search.merged_confusion(inputs.confusion["train"], lookup))[0]
        assert ours == pytest.approx(reference_predsmiou(train_gt[keep], merged[keep]), abs=1e-12)
    too_many = np.arange(31)  # 30 distinct merged ids: the reference's assert fails, the trial is dropped
    with pytest.raises(cd_search.InvalidTrial):
        cd_search.reference_cd_miou(cd_search.merged_confusion(inputs.confusion["train"], too_many))
    # Upper bound: every fine cluster to the class it is most precise for (PredsmIoU(k+1, 21), many-to-one).
    val_maps, val_gt = maps[6:], gt[6:]
    keep = val_gt != 255
    conf = np.zeros((21, 31))
    np.add.at(conf, (val_gt[keep].astype(int), val_maps[keep]), 1)
    to_class = np.argmax(conf / np.maximum(conf.sum(0), 1e-8), axis=0)
    pred = to_class[val_maps[keep]]
    expected = np.mean(
        [
            np.sum((val_gt[keep] == c) & (pred == c)) / max(np.sum((val_gt[keep] == c) | (pred == c)), 1e-8)
            for c in range(21)
        ]
    )
    assert cd_search.upper_bound(inputs) == pytest.approx(expected, abs=1e-12)


def _pixels(conf):
    """Flat (gt, pred) pixels with the given (classes x segments) counts."""
    cls, seg = np.nonzero(conf)
    reps = conf[cls, seg]
    return np.repeat(cls, reps), np.repeat(seg, reps)


def test_module_matching_by_hand():
    # 3 classes; Infomap found exactly 3 modules, ids 1..3. Segment 2 is mostly class 0, segment 3 is class 2.
    conf = np.array([[0, 0, 2, 0], [0, 4, 0, 0], [0, 0, 1, 3]])
    # The original scores ids 0..2 only (Hungarian: 1 -> class 1, 2 -> class 0, the empty 0 -> class 2) and
    # segment 3's pixels keep the reordered map's 0: class 0 has TP 2, FP 1 + 3 (IoU 1/3), class 1 IoU 1,
    # class 2 nothing predicted (IoU 0).
    score, per_class = cd_search.segment_miou(conf, "original")
    np.testing.assert_allclose(per_class, [1 / 3, 1, 0])
    assert score == pytest.approx(4 / 9)
    assert reference_predsmiou(*_pixels(conf), num_classes=3) == pytest.approx(4 / 9)
    # All modules: segment 3 takes class 2 (IoU 3/4), class 0 keeps segment 2 (TP 2, FP 1: IoU 2/3).
    score, per_class = cd_search.segment_miou(conf, "all_modules")
    np.testing.assert_allclose(per_class, [2 / 3, 1, 3 / 4])
    assert score == pytest.approx(29 / 36)
    assert not cd_search.reference_asserts(conf)


def test_more_segments_than_classes_are_scored_where_the_original_stops():
    # 2 classes, 4 segments: PredsmIoU(2, 2) asserts. The same rule without the assertion: ids 0, 1 matched
    # (0 -> class 0 with IoU 3/4, 1 -> class 1 with IoU 1/2), ids 2 and 3 read as class 0.
    conf = np.array([[3, 0, 1, 0], [0, 2, 0, 2]])
    assert cd_search.reference_asserts(conf)
    with pytest.raises(cd_search.InvalidTrial):
        cd_search.reference_cd_miou(conf)
    score, per_class = cd_search.segment_miou(conf, "original")
    np.testing.assert_allclose(per_class, [4 / 6, 2 / 4])  # class 0: TP 4, FP 2; class 1: TP 2, FN 2
    assert score == pytest.approx(7 / 12)
    rng = np.random.default_rng(23)
    inputs, _, _ = _random_cd_inputs(rng, k=8)
    lookups = [np.arange(9), np.r_[np.ones(4, int), np.full(5, 2)]]  # 9 segments; 2 segments
    scored = cd_search.val_scores(inputs, lookups)
    assert [row[2:] for row in scored] == [(9, False), (2, False)]
    many = cd_search.val_scores(inputs, [np.arange(9) * 3], "original")[0]  # ids up to 24 > 21: flagged, scored
    assert many[3] and 0 <= many[0] <= 1
    with pytest.raises(ValueError, match="all_modules"):
        cd_search.segment_miou(conf, "best")


def test_search_stops_before_the_per_k_work_when_the_data_cannot_hold_it():
    foreground = np.zeros((5, 20, 20), bool)
    foreground[:, 4:16, 4:16] = True  # 12 x 12 pixels of a 10 x 10 patch grid: 6 x 6 = 36 patches per image
    cd_search.check_support(foreground, 3, (10, 10), 72)  # val: 2 images, 72 patches
    with pytest.raises(errors.ConfigError, match="val split's 2 images hold 72 foreground patches"):
        cd_search.check_support(foreground, 3, (10, 10), 73)
    foreground[:3] = True
    with pytest.raises(errors.ConfigError, match="train split's 3 images hold 300 foreground patches and no back"):
        cd_search.check_support(foreground, 3, (10, 10), 10)
    # The smallest k goes first; a label missing from a split there stops the search before any other k.
    rng = np.random.default_rng(24)
    complete, maps, gt = _random_cd_inputs(rng, k=12)
    maps[6:][maps[6:] == 5] = 6
    incomplete = cd_search.community_inputs(maps, 6, gt[:6], gt[6:], 12)
    made, timed = [], []

    def make(k):
        made.append(k)
        return incomplete if k in (12, 16) else complete

    def trial(inputs):
        timed.append(inputs)
        raise cd_search.InvalidTrial("a dropped trial is timed too")

    with pytest.raises(errors.ConfigError, match="k_community=12, the smallest k of the search, 1 of the 13 cluster"):
        cd_search.per_k_inputs(make, [16, 12, 20], weight=float, trial=trial, trials=300, progress=False)
    assert made == [12] and not timed
    made.clear()
    cache = cd_search.per_k_inputs(make, [16, 8, 11], weight=float, trial=trial, trials=300, progress=False)
    assert made == [8, 11, 16] and set(cache) == {8, 11, 16} and len(timed) == 1 and timed[0] is complete
    assert not cache[16].complete  # a larger k missing a label: its trials are dropped later, as the original's


def test_a_cluster_missing_from_a_split_drops_the_trial():
    rng = np.random.default_rng(21)
    inputs, _, _ = _random_cd_inputs(rng)
    maps = inputs.maps.copy()
    maps[6:][maps[6:] == 3] = 4  # cluster 3 never occurs in val: the reference asserts before the graph
    gt = rng.integers(0, 21, size=maps.shape)
    partial = cd_search.community_inputs(maps, 6, gt[:6], gt[6:], 30)
    assert not partial.complete
    with pytest.raises(cd_search.InvalidTrial, match="missing"):
        cd_search.train_objective(partial, markov_time=1.0, weight_threshold=0.05, num_runs=1, preferred_modules=20)


def _planted(k, markov_time, weight_threshold):
    if k == 249:
        raise cd_search.InvalidTrial("dropped, as the reference's assertions drop trials")
    return -(((k - 149) / 180) ** 2) - ((markov_time - 1.2) / 1.9) ** 2 - ((weight_threshold - 0.04) / 0.09) ** 2


def test_search_finds_the_planted_optimum_and_is_reproducible():
    first = cd_search.search(_planted, trials=100, progress=False)
    assert first["best"] == {"weight_threshold": 0.04, "markov_time": 1.2, "k_community": 149}
    assert first["best_value"] == pytest.approx(0.0, abs=1e-12)
    rows = first["trials"]
    assert len(rows) == 100 and first["completed"] == sum(r["state"] == "COMPLETE" for r in rows)
    dropped = [r for r in rows if r["k_community"] == 249]
    assert dropped and all(r["state"] == "FAIL" and r["value"] is None for r in dropped)
    for r in rows:  # every value on NeCo's grid
        assert r["k_community"] in range(69, 250, 10)
        assert r["markov_time"] in cd_search.grid(0.1, 2.0, 0.1)
        assert r["weight_threshold"] in cd_search.grid(0.01, 0.1, 0.01)
    again = cd_search.search(_planted, trials=100, progress=False)
    params = [(r["k_community"], r["markov_time"], r["weight_threshold"]) for r in rows]
    assert params == [(r["k_community"], r["markov_time"], r["weight_threshold"]) for r in again["trials"]]
    other = cd_search.search(_planted, trials=20, seed=7, progress=False)
    assert params[:20] != [(r["k_community"], r["markov_time"], r["weight_threshold"]) for r in other["trials"]]


def test_search_history_png(tmp_path):
    from PIL import Image

    from evaluation import plots

    found = cd_search.search(_planted, trials=12, progress=False)
    found["trials"][3]["value"] = None  # a dropped trial (the search may drop others)
    dots, best, dropped = plots.search_history_figure(found).axes[0].lines
    done = [r for r in found["trials"] if r["value"] is not None]
    np.testing.assert_array_equal(dots.get_xdata(), [r["trial"] for r in done])  # a dot per completed trial
    np.testing.assert_array_equal(dots.get_ydata(), [r["value"] for r in done])
    np.testing.assert_array_equal(best.get_ydata(), [max(r["value"] for r in done[: i + 1]) for i in range(len(done))])
    assert 3 in dropped.get_xdata() and list(dropped.get_xdata()) == [
        r["trial"] for r in found["trials"] if r not in done
    ]
    path = plots.save_search_history(found, tmp_path / "history.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (720, 400)
        im.load()  # the whole file decodes


def test_cd_parameters_sources():
    assert cbfe.cd_parameters(cbfe.CbfeSettings()) == (None, "found by search")
    assert cbfe.cd_parameters(cbfe.CbfeSettings(cd_preset="leopart_vitb8")) == (
        (109, 0.4, 0.07),
        "Leopart README (leopart_vitb8)",
    )
    given = cbfe.CbfeSettings(k_community=149, markov_time=2.0, weight_threshold=0.09)
    assert cbfe.cd_parameters(given) == ((149, 2.0, 0.09), "given")
    for bad, message in [
        (dict(k_community=149), "all three"),
        (dict(cd_preset="leopart_vits16", k_community=149), "not both"),
        (dict(cd_preset="vit_huge"), "leopart_vits16"),
        (dict(k_community=300, markov_time=1.0, weight_threshold=0.1), "255"),
    ]:
        with pytest.raises(errors.ConfigError, match=message):
            cbfe.cd_parameters(cbfe.CbfeSettings(**bad))
    for bad, message in [
        (dict(search_k=(69, 299, 10)), "255"),
        (dict(search_markov_time=(0.0, 2.0, 0.1)), "0 < low"),
        (dict(search_trials=0), "at least one trial"),
    ]:
        with pytest.raises(errors.ConfigError, match=message):
            cbfe._search_space(cbfe.CbfeSettings(**bad))


def test_attention_files_replace_the_models_attention(tmp_path):
    rng = np.random.default_rng(22)
    files = {"train": rng.random((3, 1, 7, 7)) < 0.4, "val": rng.random((2, 1, 7, 7)) < 0.4}
    for split, masks in files.items():
        torch.save(torch.from_numpy(masks.astype(np.float32)), tmp_path / f"attn_{split}.pt")
    model_attn = rng.random((5, 2, 4, 4)).astype(np.float32)  # what the evaluated model would give
    s = cbfe.CbfeSettings(eval_size=14, attention_dir=str(tmp_path))
    noisy, source = cbfe.noisy_masks(s, model_attn[:3], model_attn[3:], 3, 2)
    expected = np.concatenate([files["train"][:, 0], files["val"][:, 0]])
    np.testing.assert_array_equal(noisy, nearest_resize(expected, 14))
    assert source == f"files in {tmp_path}"
    own, own_source = cbfe.noisy_masks(cbfe.CbfeSettings(eval_size=14), model_attn[:3], model_attn[3:], 3, 2)
    np.testing.assert_array_equal(own, nearest_resize(cbfe.noisy_foreground(model_attn, s), 14))
    assert own_source == "the evaluated model's CLS attention"
    with pytest.raises(errors.DatasetError, match="holds 3 masks but the split has 4"):
        cbfe.noisy_masks(s, None, None, 4, 2)
    with pytest.raises(errors.DatasetError, match="attn_train.pt does not exist"):
        cbfe.noisy_masks(cbfe.CbfeSettings(attention_dir=str(tmp_path / "none")), None, None, 3, 2)


def test_cbfe_model_without_registers():
    import jax.numpy as jnp
    from flax import nnx

    from evaluation.features import without_registers
    from neco_jax.models import VisionTransformer, get_arch

    config = get_arch("vit_tiny_test", num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True)
    model = VisionTransformer(config, rngs=nnx.Rngs(3))
    stripped = without_registers(model)
    assert stripped.config.num_register_tokens == 0 and not hasattr(stripped, "register_tokens")
    assert (stripped.config.interpolate_offset, stripped.config.interpolate_antialias) == (0.1, False)
    before, after = nnx.to_pure_dict(nnx.state(model)), nnx.to_pure_dict(nnx.state(stripped))
    assert set(before) - set(after) == {"register_tokens"}
    np.testing.assert_array_equal(after["cls_token"], before["cls_token"])
    fc2 = [state["blocks"][1]["mlp"]["fc2"]["kernel"] for state in (after, before)]
    np.testing.assert_array_equal(*fc2)
    images = jnp.asarray(np.random.default_rng(0).normal(size=(1, 70, 70, 3)), jnp.float32)
    with_regs = np.asarray(model(images)["x_norm_patchtokens"])
    without = np.asarray(stripped(images)["x_norm_patchtokens"])
    assert with_regs.shape == without.shape and not np.allclose(with_regs, without, atol=1e-4)
    assert without_registers(stripped) is stripped
