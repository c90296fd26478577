"""mIoU, confusion matrix and cluster matching against scikit-learn / SciPy and a per-pixel re-statement of the
reference `PredsmIoU` (pairwise scores by full scans, greedy many-to-one loop)."""

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import confusion_matrix as sk_confusion

from evaluation import metrics


def _reference_miou(pred, gt, num_pred, num_gt, mode):
    """PredsmIoU.compute_miou, restated pixel by pixel (gt already stripped of ignored pixels)."""

    def score(c_gt, c_pred, precision):
        g, p = gt == c_gt, pred == c_pred
        tp, fp, fn = np.sum(g & p), np.sum(~g & p), np.sum(g & ~p)
        return tp / max(tp + fp, 1e-8) if precision else tp / max(tp + fp + fn, 1e-8)

    if mode == "none":
        reordered = pred
    else:
        mat = np.array([[score(g, p, mode == "precision") for p in range(num_pred)] for g in range(num_gt)])
        reordered = np.zeros(len(pred), dtype=int)
        if mode == "hungarian":
            rows, cols = linear_sum_assignment(1 - mat)
            for r, c in zip(rows, cols):
                reordered[pred == c] = r
        else:
            for p in range(num_pred):
                best, best_score = None, None
                for g in range(num_gt):
                    if best is None or mat[g, p] > best_score:
                        best, best_score = g, mat[g, p]
                reordered[pred == p] = best
    ious = []
    for c in range(num_gt):
        g, p = gt == c, reordered == c
        tp, fp, fn = np.sum(g & p), np.sum(~g & p), np.sum(g & ~p)
        ious.append(tp / max(tp + fp + fn, 1e-8))
    return float(np.mean(ious)), np.array(ious)


def _noisy_prediction(rng, gt, num_pred, keep=0.6):
    """Predictions that follow a random class->cluster map on `keep` of the pixels, random elsewhere."""
    lut = rng.integers(0, num_pred, size=256)
    pred = lut[gt]
    noise = rng.random(gt.shape) > keep
    pred[noise] = rng.integers(0, num_pred, size=noise.sum())
    return pred


@pytest.mark.parametrize("num_classes,ignore", [(21, 255), (151, 0)])
def test_confusion_matrix_equals_sklearn(num_classes, ignore):
    rng = np.random.default_rng(0)
    gt = rng.integers(0, num_classes, size=(4, 50, 50))
    gt[rng.random(gt.shape) < 0.1] = ignore
    pred = rng.integers(0, num_classes, size=gt.shape)
    keep = gt != ignore
    ref = sk_confusion(gt[keep], pred[keep], labels=np.arange(num_classes))
    ours = metrics.confusion_matrix(pred, gt, num_classes=num_classes, ignore_index=ignore)
    np.testing.assert_array_equal(ours, ref)


def test_voc_linear_probe_miou_equals_reference():
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 21, size=(3, 40, 40))
    gt[rng.random(gt.shape) < 0.15] = 255
    pred = np.where(rng.random(gt.shape) < 0.7, gt % 21, rng.integers(0, 21, size=gt.shape))
    m, per_class = metrics.miou(pred, gt, num_classes=21, ignore_index=255)
    keep = gt != 255
    ref_m, ref_pc = _reference_miou(pred[keep], gt[keep], 21, 21, "none")
    np.testing.assert_allclose(per_class, ref_pc, rtol=1e-12)
    assert m == pytest.approx(ref_m, rel=1e-12)


def test_ade_convention_ignores_zero_and_averages_151():
    rng = np.random.default_rng(2)
    gt = rng.integers(0, 151, size=(2, 60, 60))  # 0 = "other", ignored
    pred = np.where(rng.random(gt.shape) < 0.8, gt, rng.integers(0, 151, size=gt.shape))
    m, per_class = metrics.miou(pred, gt, num_classes=151, ignore_index=0)
    keep = gt != 0
    ref_m, ref_pc = _reference_miou(pred[keep], gt[keep], 151, 151, "none")
    assert per_class.shape == (151,) and per_class[0] == 0.0
    np.testing.assert_allclose(per_class, ref_pc, rtol=1e-12)
    assert m == pytest.approx(ref_m, rel=1e-12)
    assert m == pytest.approx(per_class[1:].sum() / 151)


@pytest.mark.parametrize("num_classes,ignore", [(21, 255), (151, 0)])
def test_hungarian_equals_reference(num_classes, ignore):
    rng = np.random.default_rng(3)
    gt = rng.integers(0, num_classes, size=(2, 64, 64))
    gt[rng.random(gt.shape) < 0.1] = ignore if ignore != 0 else 0
    pred = _noisy_prediction(rng, np.where(gt == ignore, 0, gt), num_classes)
    m, per_class = metrics.miou(pred, gt, num_classes=num_classes, ignore_index=ignore, matching="hungarian")
    keep = gt != ignore
    ref_m, ref_pc = _reference_miou(pred[keep], gt[keep], num_classes, num_classes, "hungarian")
    np.testing.assert_allclose(per_class, ref_pc, rtol=1e-12)
    assert m == pytest.approx(ref_m, rel=1e-12)


def test_hungarian_recovers_a_permutation_exactly():
    rng = np.random.default_rng(4)
    gt = rng.integers(0, 21, size=(50, 50))
    perm = rng.permutation(21)
    m, per_class = metrics.miou(perm[gt], gt, num_classes=21, matching="hungarian")
    assert m == 1.0 and np.all(per_class == 1.0)


@pytest.mark.parametrize("num_pred", [50, 300])
def test_precision_many_to_one_equals_reference(num_pred):
    rng = np.random.default_rng(5)
    gt = rng.integers(0, 21, size=(2, 48, 48))
    gt[rng.random(gt.shape) < 0.1] = 255
    pred = rng.integers(0, num_pred, size=gt.shape)
    pred[gt == 3] = rng.integers(0, 5, size=(gt == 3).sum())  # some structure: clusters 0-4 mostly class 3
    m, per_class = metrics.miou(pred, gt, num_classes=21, ignore_index=255, matching="precision")
    keep = gt != 255
    ref_m, ref_pc = _reference_miou(pred[keep], gt[keep], num_pred, 21, "precision")
    np.testing.assert_allclose(per_class, ref_pc, rtol=1e-12)
    assert m == pytest.approx(ref_m, rel=1e-12)


def test_precision_matching_of_oversegmentation_is_perfect():
    rng = np.random.default_rng(6)
    gt = rng.integers(0, 21, size=(40, 40))
    pred = gt * 10 + rng.integers(0, 10, size=gt.shape)  # every class split into 10 clusters
    assert metrics.miou(pred, gt, num_classes=21, matching="precision")[0] == 1.0


def test_bad_inputs_are_rejected():
    gt = np.zeros((4, 4), int)
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.miou(np.zeros((4, 5), int), gt, num_classes=21)
    with pytest.raises(ValueError, match="outside"):
        metrics.miou(np.full((4, 4), 30), gt, num_classes=21)
    with pytest.raises(ValueError, match="unknown matching"):
        metrics.miou(gt, gt, num_classes=21, matching="greedy")
    labels = np.array([0, 3, 255, 100])  # 100: neither a class nor void
    with pytest.raises(ValueError, match="label outside"):
        metrics.confusion_matrix(np.zeros(4, int), labels, num_classes=21)
    with pytest.raises(ValueError, match="label outside"):
        metrics.confusion_matrix(np.zeros(3, int), np.array([0, 3, 300]), num_classes=21)
    # A void pixel may hold any prediction; a scored one may not.
    conf = metrics.confusion_matrix(np.array([1, 2, 99]), np.array([0, 3, 255]), num_classes=21)
    assert conf.sum() == 2 and conf[0, 1] == conf[3, 2] == 1
    with pytest.raises(ValueError, match="pred holds an id outside"):
        metrics.confusion_matrix(np.array([1, 99, 0]), np.array([0, 3, 255]), num_classes=21)
