"""Lloyd's k-means in JAX, with the behaviour of the reference's `faiss.Kmeans(d, K, niter, nredo, seed)`.

- Training may subsample at most `max_points_per_centroid * K` points (faiss's default 256; 0 = all points),
  then the final assignment covers every point.
- `restarts` runs from different initialisations; the one with the lowest objective (sum of squared
  distances) is kept, as faiss's `nredo`.
- Init "random" draws K distinct points (faiss); "kmeans++" is sklearn's greedy k-means++.
- An emptied cluster takes over half of the currently largest one: a copy of its centroid, both perturbed by
  +-1/1024 in alternating dimensions (faiss's `split_clusters`, with the largest cluster instead of a random
  draw proportional to size).

Distances are ||x||^2 - 2 x.c + ||c||^2 with fp32 HIGHEST-precision matmuls; points are processed in chunks so
that the (chunk x K) distance block, not (N x K), bounds memory.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from neco_jax.l2_norm import l2_normalize

_HIGHEST = jax.lax.Precision.HIGHEST
_SPLIT_EPS = 1.0 / 1024.0


@dataclasses.dataclass(frozen=True)
class KMeansResult:
    centroids: np.ndarray  # (K, D)
    labels: np.ndarray  # (N,) int32, nearest centroid of every input point
    objective: float  # sum of squared distances of all points to their centroid
    train_objective: float  # the same over the (possibly subsampled) training points, which picked the restart


def _chunked(x: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """(N, D) -> (n_chunks, chunk, D) zero-padded, and (n_chunks, chunk) weights (0 on padding)."""
    n = x.shape[0]
    chunk = min(chunk, n)
    pad = -n % chunk
    xs = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, chunk, x.shape[1])
    ws = jnp.pad(jnp.ones((n,), x.dtype), (0, pad)).reshape(-1, chunk)
    return xs, ws


def _nearest(xc: jax.Array, centroids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Index of and squared distance to the nearest centroid for a (chunk, D) block."""
    d2 = (
        jnp.sum(xc * xc, axis=1, keepdims=True)
        - 2.0 * jnp.matmul(xc, centroids.T, precision=_HIGHEST)
        + jnp.sum(centroids * centroids, axis=1)[None, :]
    )
    idx = jnp.argmin(d2, axis=1)
    return idx, jnp.maximum(jnp.take_along_axis(d2, idx[:, None], axis=1)[:, 0], 0.0)


def _assign_stats(xs, ws, centroids):
    """Per-cluster sums and counts of the nearest-centroid assignment, and its objective."""
    k, d = centroids.shape

    def body(carry, inputs):
        sums, counts, obj = carry
        xc, wc = inputs
        idx, dist = _nearest(xc, centroids)
        onehot = jax.nn.one_hot(idx, k, dtype=xc.dtype) * wc[:, None]
        sums = sums + jnp.matmul(onehot.T, xc, precision=_HIGHEST)
        return (sums, counts + onehot.sum(0), obj + jnp.sum(dist * wc)), None

    init = (jnp.zeros((k, d), xs.dtype), jnp.zeros((k,), xs.dtype), jnp.zeros((), xs.dtype))
    (sums, counts, obj), _ = jax.lax.scan(body, init, (xs, ws))
    return sums, counts, obj


def _split_empty(centroids: jax.Array, counts: jax.Array) -> jax.Array:
    """Give every empty cluster half of the largest cluster (faiss-style split with a small perturbation)."""
    k, d = centroids.shape
    signs = jnp.where(jnp.arange(d) % 2 == 0, 1.0, -1.0).astype(centroids.dtype)

    def one(i, state):
        cents, cnts = state

        def split(state):
            cents, cnts = state
            j = jnp.argmax(cnts)
            c = cents[j]
            cents = cents.at[i].set(c * (1 + _SPLIT_EPS * signs)).at[j].set(c * (1 - _SPLIT_EPS * signs))
            half = jnp.floor(cnts[j] / 2)
            return cents, cnts.at[i].set(half).at[j].add(-half)

        return jax.lax.cond(cnts[i] == 0, split, lambda s: s, (cents, cnts))

    def split_all(centroids):
        return jax.lax.fori_loop(0, k, one, (centroids, counts))[0]

    return jax.lax.cond(jnp.any(counts == 0), split_all, lambda c: c, centroids)


@functools.partial(jax.jit, static_argnames=("iters", "spherical"))
def _lloyd(xs, ws, centroids, iters: int, spherical: bool = False):
    def step(_, centroids):
        sums, counts, _ = _assign_stats(xs, ws, centroids)
        new = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], centroids)
        new = _split_empty(new, counts)
        return l2_normalize(new) if spherical else new  # faiss post_process_centroids

    centroids = jax.lax.fori_loop(0, iters, step, centroids)
    return centroids, _assign_stats(xs, ws, centroids)[2]


@jax.jit
def _assign(xs, centroids):
    def body(_, xc):
        return None, _nearest(xc, centroids)

    _, (idx, dist) = jax.lax.scan(body, None, xs)
    return idx.reshape(-1), dist.reshape(-1)


def assign(x, centroids, *, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (int32) and squared distance of every row of x."""
    x = jnp.asarray(x, jnp.float32)
    xs, _ = _chunked(x, chunk)
    idx, dist = _assign(xs, jnp.asarray(centroids, jnp.float32))
    n = x.shape[0]
    return np.asarray(idx[:n], np.int32), np.asarray(dist[:n])


def _init_centroids(key: jax.Array, x: jax.Array, k: int, init: str) -> jax.Array:
    n = x.shape[0]
    if init == "random":
        return x[jax.random.choice(key, n, (k,), replace=False)]
    if init == "kmeans++":
        return _kmeans_pp(key, x, k)
    raise ValueError(f"unknown k-means init {init!r}; use 'random' or 'kmeans++'")


@functools.partial(jax.jit, static_argnames=("k",))
def _kmeans_pp(key, x, k: int):
    """Greedy k-means++ (sklearn's): each step draws 2 + log(k) candidates by D^2 sampling and keeps the one
    that lowers the total squared distance most."""
    n = x.shape[0]
    trials = 2 + int(np.log(k))
    key, sub = jax.random.split(key)
    first = x[jax.random.randint(sub, (), 0, n)]
    cents = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(first)
    d2 = jnp.sum(jnp.square(x - first), axis=1)

    def body(i, state):
        cents, d2, key = state
        key, sub = jax.random.split(key)
        cum = jnp.cumsum(d2)
        picks = jnp.searchsorted(cum, jax.random.uniform(sub, (trials,)) * cum[-1])
        cand = x[jnp.minimum(picks, n - 1)]
        cand_d2 = jnp.minimum(d2[None, :], jnp.sum(jnp.square(x[None] - cand[:, None]), axis=-1))
        best = jnp.argmin(cand_d2.sum(axis=1))
        return cents.at[i].set(cand[best]), cand_d2[best], key

    return jax.lax.fori_loop(1, k, body, (cents, d2, key))[0]


def kmeans(
    x,
    k: int,
    *,
    iters: int = 100,
    restarts: int = 5,
    seed: int = 0,
    init: str = "random",
    max_points_per_centroid: int = 256,
    chunk: int = 65536,
    spherical: bool = False,
) -> KMeansResult:
    """k-means of (N, D) points; the best of `restarts` runs by training objective.

    `spherical` (faiss `spherical=True`) renormalises the centroids to unit length after the init and after every
    update. With unit centroids the nearest centroid by L2 is the one of largest inner product, so assignments,
    and the restart chosen by the L2 objective, are those of faiss's inner-product index.
    """
    x = jnp.asarray(x, jnp.float32)
    n = x.shape[0]
    if k > n:
        raise ValueError(f"cannot make {k} clusters of {n} points")
    key = jax.random.key(seed)
    train = x
    if max_points_per_centroid and n > k * max_points_per_centroid:
        key, sub = jax.random.split(key)
        train = x[jnp.sort(jax.random.choice(sub, n, (k * max_points_per_centroid,), replace=False))]
    xs, ws = _chunked(train, chunk)
    best = None
    for r in range(restarts):
        c0 = _init_centroids(jax.random.fold_in(key, r), train, k, init)
        if spherical:
            c0 = l2_normalize(c0)
        cents, obj = _lloyd(xs, ws, c0, iters, spherical)
        obj = float(obj)
        if best is None or obj < best[1]:
            best = (cents, obj)
    labels, dist = assign(x, best[0], chunk=chunk)
    return KMeansResult(np.asarray(best[0]), labels, float(dist.astype(np.float64).sum()), best[1])
