"""Standardisation and PCA of patch features, as the reference's `normalize_and_transform`.

The reference standardises with sklearn's `StandardScaler` (population std, zero-variance dims left unscaled)
and projects with `faiss.PCAMatrix(D, 50)`: mean-centred, no whitening, fitted on a random subsample of at most
1000 * D vectors (faiss's `max_points_per_d`): the rows faiss's own generator picks (`evaluation.faiss_random`). The D x D covariance is accumulated on the accelerator; its
eigendecomposition runs on the host in float64. Components carry sklearn's sign convention (the largest-|.|
entry of each component is positive) so that results are comparable with sklearn; k-means does not care.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from evaluation import faiss_random

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Standardizer:
    mean: np.ndarray  # (D,)
    scale: np.ndarray  # (D,), population std with zeros replaced by 1 (sklearn's `scale_`)

    def __call__(self, x) -> jax.Array:
        return (jnp.asarray(x, jnp.float32) - self.mean) / self.scale


@jax.jit
def _mean_var(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    mean = jnp.mean(x, axis=0)
    var = jnp.mean(jnp.square(x - mean), axis=0)  # two-pass: no cancellation
    return mean, var


def fit_standardizer(x) -> Standardizer:
    """Per-dimension mean and population std of (N, D) features."""
    mean, var = _mean_var(jnp.asarray(x, jnp.float32))
    scale = np.sqrt(np.asarray(var, np.float64))
    scale[scale == 0.0] = 1.0  # sklearn leaves constant dimensions unscaled
    return Standardizer(np.asarray(mean, np.float32), scale.astype(np.float32))


@dataclasses.dataclass(frozen=True)
class PCA:
    mean: np.ndarray  # (D,)
    components: np.ndarray  # (n_components, D), rows are unit eigenvectors, largest variance first
    explained_variance: np.ndarray  # (n_components,)

    def __call__(self, x) -> jax.Array:
        return _project(jnp.asarray(x, jnp.float32), self.mean, self.components)


@jax.jit
def _project(x, mean, components):
    return jnp.matmul(x - mean, components.T, precision=_HIGHEST)


@jax.jit
def _mean_cov(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    mean = jnp.mean(x, axis=0)
    xc = x - mean
    return mean, jnp.matmul(xc.T, xc, precision=_HIGHEST)


def fit_pca(x, n_components: int, *, max_points: int = 0, seed: int = faiss_random.PCA_SUBSAMPLE_SEED) -> PCA:
    """PCA of (N, D) features; with `max_points` > 0 fitted on the subsample of that many rows that faiss's
    ``fvecs_maybe_subsample`` draws with ``seed``."""
    n, d = x.shape
    if n_components > d:
        raise ValueError(f"cannot keep {n_components} components of {d}-dimensional features")
    if max_points and n > max_points:
        x = x[faiss_random.rand_perm_prefix(n, seed, max_points)]
        n = max_points
    mean, scatter = _mean_cov(jnp.asarray(x, jnp.float32))
    cov = np.asarray(scatter, np.float64) / max(n - 1, 1)
    evals, evecs = np.linalg.eigh(cov)
    order = np.argsort(evals)[::-1][:n_components]
    comps = evecs[:, order].T
    signs = np.sign(comps[np.arange(n_components), np.argmax(np.abs(comps), axis=1)])
    comps *= signs[:, None]
    return PCA(np.asarray(mean, np.float32), comps.astype(np.float32), evals[order])


def standardize_and_project(x, n_components: int, *, max_points_per_dim: int = 1000) -> jax.Array:
    """The reference's `normalize_and_transform`: standardise, then PCA to `n_components` (faiss subsample)."""
    x = jnp.asarray(x, jnp.float32)
    z = fit_standardizer(x)(x)
    pca = fit_pca(z, n_components, max_points=max_points_per_dim * x.shape[1])
    return pca(z)
