"""k-means, standardisation and PCA against scikit-learn on the same data."""

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from evaluation import kmeans as km
from evaluation import pca as pca_lib


def _blobs(seed, n=1500, d=8, centers=12, spread=1.0):
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 4, size=(centers, d))
    return (means[rng.integers(0, centers, n)] + rng.normal(0, spread, size=(n, d))).astype(np.float32)


def _sklearn_objective(x, k, seed):
    return KMeans(n_clusters=k, n_init=5, max_iter=100, random_state=seed).fit(x.astype(np.float64)).inertia_


@pytest.mark.parametrize("init", ["random", "kmeans++"])
@pytest.mark.parametrize("seed", [0, 1])
def test_objective_within_one_percent_of_sklearn(init, seed):
    x = _blobs(seed, spread=2.5)  # overlapping blobs: local optima exist
    res = km.kmeans(x, 12, iters=100, restarts=5, seed=seed, init=init, max_points_per_centroid=0, chunk=512)
    ref = _sklearn_objective(x, 12, seed)
    assert res.objective <= ref * 1.01, (res.objective, ref)


def test_structureless_data_within_one_percent():
    x = np.random.default_rng(3).uniform(size=(2000, 5)).astype(np.float32)
    res = km.kmeans(x, 20, iters=100, restarts=5, seed=3, max_points_per_centroid=0, chunk=700)
    assert res.objective <= _sklearn_objective(x, 20, 3) * 1.01


def test_result_is_consistent_lloyd_fixed_point():
    """Labels are the nearest centroids, the objective is their squared distances, centroids are cluster means."""
    x = _blobs(5)
    res = km.kmeans(x, 12, seed=5, max_points_per_centroid=0)
    d2 = ((x[:, None, :].astype(np.float64) - res.centroids[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_array_equal(res.labels, d2.argmin(1))
    np.testing.assert_allclose(res.objective, d2.min(1).sum(), rtol=1e-5)
    for c in range(12):
        np.testing.assert_allclose(res.centroids[c], x[res.labels == c].mean(0), rtol=1e-4, atol=1e-4)


def test_subsampling_trains_on_k_times_max_points():
    x = _blobs(6, n=3000)
    res = km.kmeans(x, 4, seed=0, max_points_per_centroid=10, restarts=2)  # trains on 40 points
    assert res.labels.shape == (3000,)
    ref = _sklearn_objective(x, 4, 0)
    assert res.objective <= ref * 1.5  # a 40-point fit is still a sane clustering of all 3000


def test_empty_clusters_are_refilled():
    # Duplicated points: random init can pick identical centroids, so some clusters start empty.
    x = np.repeat(_blobs(7, n=60, centers=6), 10, axis=0)
    start = km.kmeans(x, 6, seed=0, max_points_per_centroid=0, restarts=1, iters=0)
    assert np.bincount(start.labels, minlength=6).min() == 0  # the case under test does occur
    res = km.kmeans(x, 6, seed=0, max_points_per_centroid=0, restarts=1)
    assert np.bincount(res.labels, minlength=6).min() > 0
    assert np.isfinite(res.centroids).all()


def test_split_empty_takes_half_of_the_largest_cluster():
    cents = np.array([[1.0, 2.0], [5.0, 5.0], [9.0, 9.0]], np.float32)
    counts = np.array([3.0, 0.0, 8.0], np.float32)
    out = np.asarray(km._split_empty(cents, counts))
    eps = 1 / 1024
    np.testing.assert_allclose(out[0], cents[0])
    np.testing.assert_allclose(out[1], cents[2] * [1 + eps, 1 - eps], rtol=1e-6)
    np.testing.assert_allclose(out[2], cents[2] * [1 - eps, 1 + eps], rtol=1e-6)


def test_standardizer_equals_sklearn():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(3000, 6)) * [1, 5, 0.1, 20, 2, 3] + [0, 3, -1, 100, 2, 0]).astype(np.float32)
    x[:, 4] = 7.0  # a constant dimension: sklearn keeps it unscaled
    ref = StandardScaler().fit(x.astype(np.float64))
    ours = pca_lib.fit_standardizer(x)
    np.testing.assert_allclose(ours.mean, ref.mean_, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.scale, ref.scale_, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ours(x)), ref.transform(x.astype(np.float64)), rtol=1e-5, atol=1e-4)


def test_pca_equals_sklearn():
    rng = np.random.default_rng(1)
    d = 12
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    x = ((rng.normal(size=(4000, d)) * np.linspace(6, 0.5, d)) @ basis.T + rng.normal(size=d)).astype(np.float32)
    ref = PCA(n_components=5, svd_solver="full").fit(x.astype(np.float64))
    ours = pca_lib.fit_pca(x, 5)
    np.testing.assert_allclose(ours.components, ref.components_, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.explained_variance, ref.explained_variance_, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ours(x)), ref.transform(x.astype(np.float64)), rtol=1e-5, atol=1e-4)


def test_pca_subsample_fits_on_that_many_rows():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1000, 4)).astype(np.float32) * [4, 3, 2, 1]
    rows = np.sort(np.random.default_rng(9).choice(1000, 200, replace=False))
    ref = PCA(n_components=2, svd_solver="full").fit(x[rows].astype(np.float64))
    ours = pca_lib.fit_pca(x, 2, max_points=200, seed=9)
    np.testing.assert_allclose(ours.components, ref.components_, rtol=1e-5, atol=1e-5)
