"""k-means against faiss (the reference's own k-means) and scikit-learn; standardisation and PCA against
scikit-learn, on the same data."""

import faiss
import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from evaluation import faiss_random
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


# ----------------------------------------------------------------------------- against faiss


def _pca_like(n, seed, d=50):
    """Features as the CBFE k-means sees them: a decaying spectrum, ||x|| ~ 18 (||x||^2 ~ 340), off-centre."""
    rng = np.random.default_rng(seed)
    scale = np.sqrt(np.geomspace(40.0, 0.5, d))
    x = (rng.normal(size=d) * 0.9 + rng.normal(size=(n, d)) * 0.45) * scale
    return (x * 18 / np.linalg.norm(x, axis=1).mean()).astype(np.float32)


def _faiss_kmeans(x, k, *, niter, nredo=1, seed=1234, spherical, init=None, max_points_per_centroid=256):
    ref = faiss.Kmeans(x.shape[1], k, niter=niter, nredo=nredo, seed=seed, spherical=spherical)
    ref.cp.max_points_per_centroid = max_points_per_centroid
    ref.train(x, init_centroids=init)
    return ref, ref.index.search(x, 1)[1][:, 0]


def _avx512_faiss() -> bool:
    return "AVX512" in faiss.get_compile_options().split()


@pytest.mark.parametrize("spherical", [True, False])
def test_equals_faiss_label_for_label_from_the_same_start(spherical):
    """4,000 points, K = 200, 30 iterations from the same start. The seed is one where ranking the spherical
    assignment by ||x||^2 - 2 x.c + ||c||^2 (this module's earlier rule) ends 26 labels away from faiss."""
    x = _pca_like(4000, seed=0)
    start = x[np.random.default_rng(0).choice(4000, 200, replace=False)]
    ref, ref_labels = _faiss_kmeans(x, 200, niter=30, spherical=spherical, init=start)
    ours = km.kmeans(x, 200, iters=30, restarts=1, init=start, spherical=spherical)
    np.testing.assert_array_equal(ours.labels, ref_labels)
    if not spherical or _avx512_faiss():  # the norm's summation order is that of faiss's AVX-512 build
        np.testing.assert_array_equal(ours.centroids, ref.centroids)
    np.testing.assert_allclose(ours.centroids, ref.centroids, rtol=0, atol=1e-6)


@pytest.mark.parametrize("spherical", [True, False])
def test_equals_faiss_with_its_own_subsample_starts_and_restarts(spherical):
    """faiss.Kmeans(d, K, niter, nredo, seed) end to end: 6,000 points subsampled to 20 x 64, 3 restarts."""
    x = _pca_like(6000, seed=3, d=16)
    _, ref_labels = _faiss_kmeans(x, 20, niter=20, nredo=3, seed=5, spherical=spherical, max_points_per_centroid=64)
    ours = km.kmeans(x, 20, iters=20, restarts=3, seed=5, spherical=spherical, max_points_per_centroid=64)
    np.testing.assert_array_equal(ours.labels, ref_labels)


def test_faiss_random_rows_and_subsample():
    """faiss with 0 iterations returns its starting rows: those of ``faiss_random.rand_perm_prefix``."""
    x = np.random.default_rng(0).normal(size=(3000, 8)).astype(np.float32)
    ref, _ = _faiss_kmeans(x, 10, niter=0, seed=7, spherical=False, max_points_per_centroid=20)
    subsample = faiss_random.rand_perm_prefix(3000, 7, 200)
    rows = faiss_random.rand_perm_prefix(200, 8, 10)
    np.testing.assert_array_equal(ref.centroids, x[subsample[rows]])


@pytest.mark.parametrize("spherical", [True, False])
def test_empty_clusters_are_split_as_faiss_splits_them(spherical):
    """20 starts on the far side of the data get no point: faiss's draws pick the clusters they split."""
    x = _pca_like(3000, seed=1)
    rng = np.random.default_rng(1)
    away = -x.mean(axis=0) * 40 / np.linalg.norm(x.mean(axis=0))
    start = x[rng.choice(3000, 200, replace=False)]
    start[180:] = away + rng.normal(size=(20, 50)).astype(np.float32)
    ref, ref_labels = _faiss_kmeans(x, 200, niter=10, spherical=spherical, init=start)
    assert ref.iteration_stats[0]["nsplit"] == 20  # the case under test does occur
    ours = km.kmeans(x, 200, iters=10, restarts=1, init=start, spherical=spherical)
    np.testing.assert_array_equal(ours.labels, ref_labels)


def test_spherical_assignment_resolves_inner_products_the_l2_expansion_cannot():
    """Two unit centroids a few 1e-6 apart in inner product with points of ||x|| ~ 18: the assignment is faiss's
    inner-product search, point for point, where ||x||^2 - 2 x.c + ||c||^2 in float32 gets many wrong."""
    rng = np.random.default_rng(2)
    x = _pca_like(5000, seed=2)
    c = rng.normal(size=(1, 50))
    c = np.concatenate([c, c + rng.normal(size=(1, 50)) * 2e-7]).astype(np.float32)
    faiss.normalize_L2(c)
    index = faiss.IndexFlatIP(50)
    index.add(c)
    ref = index.search(x, 1)[1][:, 0]
    ours, _ = km.assign(x, c, spherical=True)
    np.testing.assert_array_equal(ours, ref)
    assert 0 < ref.mean() < 1  # both centroids win somewhere
    x64, c64 = x.astype(np.float64), c.astype(np.float64)
    l2 = (x * x).sum(1, keepdims=True) - 2 * (x @ c.T) + (c * c).sum(1)  # float32, the rejected rule
    exact = np.argmax(x64 @ c64.T, axis=1)
    assert (np.argmin(l2, axis=1) != exact).sum() > 100


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


def test_pca_subsample_is_faiss_pcamatrix_s():
    """Above 1000 rows per dimension faiss.PCAMatrix fits on rows of its own drawing; so does ``fit_pca``. Two close
    variances make the components depend on which rows: fitted on all rows they are off by more than the bound."""
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(6000, 4)) * [4, 3.9, 2, 1]).astype(np.float32)
    ref = faiss.PCAMatrix(4, 2)
    ref.train(x)  # on 4,000 of the 6,000 rows (max_points_per_d = 1000)
    ref_components = faiss.vector_to_array(ref.A).reshape(2, 4)
    ours = pca_lib.fit_pca(x, 2, max_points=4000)
    signs = np.sign((ours.components * ref_components).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(ours.components, signs * ref_components, atol=1e-6)
    everything = pca_lib.fit_pca(x, 2)
    assert np.abs(np.abs((everything.components * ref_components).sum(axis=1)) - 1).max() > 1e-3
