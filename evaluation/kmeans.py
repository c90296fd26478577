"""Lloyd's k-means in JAX, computed as the reference's ``faiss.Kmeans(d, K, niter, nredo, seed, spherical)``.

What follows faiss (``faiss/Clustering.cpp``, ``faiss/impl/ClusteringHelpers.cpp``, ``faiss/utils/random.cpp``
and ``faiss/utils/distances_simd.cpp`` in facebookresearch/faiss; NeCo pins faiss-cpu 1.10.0):
- the training subsample: above ``max_points_per_centroid * K`` points (faiss's default 256; 0 = all points),
  the first ``K * max_points_per_centroid`` entries of faiss's ``rand_perm(n, seed)``, in that order; the final
  assignment covers every point;
- init "random": restart r starts from the rows ``rand_perm(n_train, seed + 1 + r * 15486557)[:K]`` (faiss's
  draws: ``evaluation.faiss_random``);
- the assignment: spherical k-means (``spherical=True``) takes the largest inner product x.c with the unit
  centroids, as faiss's inner-product index; the plain one the smallest ||x||^2 - 2 x.c + ||c||^2 (L2 index).
  The first centroid wins ties, as faiss's top-1 search. (Ranking by the L2 expansion instead, as this module
  once did for spherical k-means, loses the inner products' last 4 bits at ||x||^2 ~ 340.);
- the update: each centroid's sum adds its points one by one in training-set order, in float32, then is
  multiplied by 1 / count (faiss's ``compute_centroids``). ``.at[labels].add`` is that loop on the CPU (XLA
  runs a scatter-add in index order); GPUs add with atomics in no fixed order;
- an empty cluster takes half of a cluster drawn with probability (count - 1) / (n - K), scanning clusters
  0, 1, ... with the draws of ``mt19937(1234)`` restarted at every update, and both centroids are perturbed
  by +-1/1024 in alternating dimensions (faiss's ``split_clusters``); after 10 K draws for one cluster (or
  when the table of draws runs out) the largest cluster is split (faiss >= 1.14.2's fallback);
- spherical: centroids times 1 / ||c|| after the init and after every update (``fvec_renorm_L2``);
- ``restarts`` (faiss's ``nredo``): the restart with the best objective of its last assignment (sum of squared
  distances, lowest; or of inner products, highest) is kept, the first one on ties.

The order of the float32 sums of spherical k-means, where faiss's rounding decides near-ties (tests/test_kmeans.py
compares labels with faiss):
- an inner product x.c adds its D products in dimension order, each with a fused multiply-add (what OpenBLAS's
  sgemm kernels do for faiss's search; a ``lax.scan`` over dimensions, which XLA compiles to FMAs);
- ||c||^2 is faiss 1.10's AVX-512 build of ``fvec_norm_L2sqr``: squares added into 16 lanes (dimensions i, i + 16,
  ...; products rounded, then added), the lanes summed as halves (8 + 8, 4 + 4, 2 + 2, 1 + 1), then the last
  D mod 16 squares added one by one with fused multiply-adds (checked at D = 50, the protocol's PCA size).
The plain k-means keeps XLA's matmul for x.c and its own order for the norms and objectives.

Init "kmeans++" is scikit-learn's greedy k-means++ (not faiss's). ``init`` may also be a (K, D) array of starting
centroids, used by every restart (faiss's ``Kmeans.train(x, init_centroids=...)``). Points are assigned in
chunks so that a (chunk x K) block, not (N x K), bounds memory.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from evaluation import faiss_random

_HIGHEST = jax.lax.Precision.HIGHEST
_SPLIT_EPS = np.float32(1.0 / 1024.0)  # faiss's EPS, "a bit above machine epsilon for float16"
_SPLIT_SEED = 1234  # split_clusters' RandomGenerator seed, the same at every update
_SPLIT_DRAWS = 1 << 17  # draws of that generator kept in a table (512 KiB)
_REDO_SEED_STRIDE = 15486557  # faiss's seed offset between restarts
_LANES = 16  # float32 lanes of an AVX-512 register: fvec_norm_L2sqr's partial sums
_IN_ORDER_ROWS = 2048  # rows per block of in-order inner products: a (2048 x K) accumulator stays in cache


@dataclasses.dataclass(frozen=True)
class KMeansResult:
    centroids: np.ndarray  # (K, D); unit rows for spherical k-means
    labels: np.ndarray  # (N,) int32, nearest centroid of every input point
    objective: float  # over all points: sum of squared distances (spherical: of inner products) to their centroid
    train_objective: float  # faiss's objective of the kept restart: its last assignment of the training points


# ----------------------------------------------------------------------------- faiss's random draws


@functools.cache
def _split_draws() -> np.ndarray:
    """float32 draws of ``split_clusters``' generator: ``mt() / float(mt.max())`` (the divisor rounds to 2^32)."""
    return faiss_random.mt19937_uint32(_SPLIT_SEED, _SPLIT_DRAWS).astype(np.float32) / np.float32(2**32 - 1)


# ----------------------------------------------------------------------------- one Lloyd iteration


def _fma_sum(acc: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """acc + sum_j a[j] * b[j], one fused multiply-add per j in order (XLA contracts the scanned ``acc + a * b``)."""
    return jax.lax.scan(lambda s, ab: (s + ab[0] * ab[1], None), acc, (a, b))[0]


def _inner_products_in_order(xc: jax.Array, centroids: jax.Array) -> jax.Array:
    """(rows, K) inner products, each summed over dimensions in order with FMAs, as faiss's sgemm computes them."""
    acc = jnp.zeros((xc.shape[0], centroids.shape[0]), xc.dtype)
    return _fma_sum(acc, xc.T[:, :, None], centroids.T[:, None, :])


def _faiss_sq_norms(c: jax.Array) -> jax.Array:
    """(K, 1) squared norms of the rows in faiss 1.10's AVX-512 order (see the module docstring)."""
    k, d = c.shape
    full = d - d % _LANES
    squares = jax.lax.optimization_barrier(c[:, :full] * c[:, :full])  # rounded before the adds: no FMA
    lanes = jax.lax.scan(
        lambda s, v: (s + v, None), jnp.zeros((k, _LANES), c.dtype), squares.reshape(k, -1, _LANES).transpose(1, 0, 2)
    )[0]
    while lanes.shape[1] > 1:
        half = lanes.shape[1] // 2
        lanes = lanes[:, :half] + lanes[:, half:]
    return _fma_sum(lanes[:, 0], c[:, full:].T, c[:, full:].T)[:, None]


def _best(xc: jax.Array, centroids: jax.Array, spherical: bool) -> tuple[jax.Array, jax.Array]:
    """Index of the best centroid for each row of a (chunk, D) block, and its inner product (spherical) or
    squared distance."""
    if spherical:
        ip = _inner_products_in_order(xc, centroids)
        idx = jnp.argmax(ip, axis=1)
        return idx, jnp.take_along_axis(ip, idx[:, None], axis=1)[:, 0]
    ip = jnp.matmul(xc, centroids.T, precision=_HIGHEST)
    d2 = jnp.sum(xc * xc, axis=1, keepdims=True) - 2.0 * ip + jnp.sum(centroids * centroids, axis=1)[None, :]
    idx = jnp.argmin(d2, axis=1)
    return idx, jnp.maximum(jnp.take_along_axis(d2, idx[:, None], axis=1)[:, 0], 0.0)


def _assign_all(x: jax.Array, centroids: jax.Array, chunk: int, spherical: bool) -> tuple[jax.Array, jax.Array]:
    """Best centroid and its score for every row of x, ``chunk`` rows at a time (zero rows pad the last chunk)."""
    n, d = x.shape
    chunk = min(chunk, n, _IN_ORDER_ROWS if spherical else n)
    xs = jnp.pad(x, ((0, -n % chunk), (0, 0))).reshape(-1, chunk, d)
    _, (idx, score) = jax.lax.scan(lambda _, xc: (None, _best(xc, centroids, spherical)), None, xs)
    return idx.reshape(-1)[:n], score.reshape(-1)[:n]


def _renorm(centroids: jax.Array) -> jax.Array:
    """faiss's ``fvec_renorm_L2``: rows times 1 / ||row|| (a reciprocal, then a product; zero rows unchanged).

    Not ``neco_jax.l2_norm.l2_normalize``, which divides by the norm: the two differ in the last bit. The
    barrier keeps XLA from rewriting 1 / sqrt as its approximate rsqrt, which differs in the last bit too."""
    sq = _faiss_sq_norms(centroids)
    inv = 1.0 / jax.lax.optimization_barrier(jnp.sqrt(jnp.where(sq > 0, sq, 1.0)))
    return jnp.where(sq > 0, centroids * inv, centroids)


def _split_empty(centroids: jax.Array, counts: jax.Array, n: int) -> jax.Array:
    """faiss's ``split_clusters``: every empty cluster, in index order, takes half of a drawn cluster."""
    k, d = centroids.shape
    draws = jnp.asarray(_split_draws())
    max_tries = 10 * k
    up = jnp.where(jnp.arange(d) % 2 == 0, 1 + _SPLIT_EPS, 1 - _SPLIT_EPS).astype(centroids.dtype)
    down = jnp.where(jnp.arange(d) % 2 == 0, 1 - _SPLIT_EPS, 1 + _SPLIT_EPS).astype(centroids.dtype)
    denominator = jnp.float32(n - k)

    def one(ci, state):
        cents, cnts, t = state

        def split(state):
            cents, cnts, t = state

            # Try cluster cj = tries % k with the next draw; a hit keeps cj (tries stops counting).
            def cond(s):
                tries, t, hit = s
                return ~hit & (tries < max_tries) & (t < _SPLIT_DRAWS)

            def body(s):
                tries, t, _ = s
                hit = draws[t] < (cnts[tries % k] - 1.0) / denominator
                return jnp.where(hit, tries, tries + 1), t + 1, hit

            tries, t, hit = jax.lax.while_loop(cond, body, (jnp.int32(0), t, jnp.bool_(False)))
            cj = jnp.where(hit, tries % k, jnp.argmax(cnts))
            c = cents[cj]
            cents = cents.at[ci].set(c * up).at[cj].set(c * down)
            half = cnts[cj] / 2
            return cents, cnts.at[ci].set(half).at[cj].add(-half), t

        return jax.lax.cond(cnts[ci] == 0, split, lambda s: s, (cents, cnts, t))

    def split_all(centroids):
        return jax.lax.fori_loop(0, k, one, (centroids, counts, jnp.int32(0)))[0]

    return jax.lax.cond(jnp.any(counts == 0), split_all, lambda c: c, centroids)


@functools.partial(jax.jit, static_argnames=("iters", "spherical", "chunk"))
def _lloyd(x, centroids, iters: int, spherical: bool, chunk: int):
    """``iters`` faiss iterations from the (already renormalised) start; the centroids, and the objective of the
    last iteration's assignment (0 without iterations, as faiss)."""
    n = x.shape[0]
    k = centroids.shape[0]

    def step(_, state):
        centroids, _ = state
        labels, score = _assign_all(x, centroids, chunk, spherical)
        sums = jnp.zeros_like(centroids).at[labels].add(x)  # point by point, in order (see the module docstring)
        counts = jnp.zeros((k,), x.dtype).at[labels].add(1.0)
        new = sums * (1.0 / jnp.where(counts > 0, counts, 1.0))[:, None]
        new = _split_empty(new, counts, n)
        return (_renorm(new) if spherical else new), jnp.sum(score)

    return jax.lax.fori_loop(0, iters, step, (centroids, jnp.zeros((), x.dtype)))


@functools.partial(jax.jit, static_argnames=("chunk", "spherical"))
def _assign(x, centroids, chunk: int, spherical: bool):
    return _assign_all(x, centroids, chunk, spherical)


def assign(x, centroids, *, chunk: int = 65536, spherical: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Best centroid (int32) of every row of x, and its squared distance (spherical: inner product)."""
    idx, score = _assign(jnp.asarray(x, jnp.float32), jnp.asarray(centroids, jnp.float32), chunk, spherical)
    return np.asarray(idx, np.int32), np.asarray(score)


# ----------------------------------------------------------------------------- inits and the driver


def _init_centroids(x: jax.Array, k: int, init, *, seed: int, restart: int) -> jax.Array:
    if isinstance(init, str) and init == "random":
        rows = faiss_random.rand_perm_prefix(x.shape[0], seed + 1 + restart * _REDO_SEED_STRIDE, k)
        return x[rows]
    if isinstance(init, str) and init == "kmeans++":
        return _kmeans_pp(jax.random.fold_in(jax.random.key(seed), restart), x, k)
    if isinstance(init, str):
        raise ValueError(f"unknown k-means init {init!r}; use 'random', 'kmeans++' or a (K, D) array")
    start = jnp.asarray(init, jnp.float32)
    if start.shape != (k, x.shape[1]):
        raise ValueError(f"init centroids have shape {start.shape}; need {(k, x.shape[1])}")
    return start


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
    init="random",
    max_points_per_centroid: int = 256,
    chunk: int = 65536,
    spherical: bool = False,
) -> KMeansResult:
    """k-means of (N, D) points as ``faiss.Kmeans(D, k, niter=iters, nredo=restarts, seed=seed, spherical=...)``
    trains it, then every point assigned to the kept centroids (the reference's ``kmeans.index.search(x, 1)``)."""
    x = np.asarray(x, np.float32)
    n = x.shape[0]
    if k > n:
        raise ValueError(f"cannot make {k} clusters of {n} points")
    train = x
    if max_points_per_centroid and n > k * max_points_per_centroid:
        train = x[faiss_random.rand_perm_prefix(n, seed, k * max_points_per_centroid)]
    train = jnp.asarray(train)
    best = None
    for r in range(restarts):
        start = _init_centroids(train, k, init, seed=seed, restart=r)
        if spherical:
            start = _renorm(start)  # faiss's post_process_centroids after the init
        cents, obj = _lloyd(train, start, iters, spherical, chunk)
        obj = float(obj)
        if best is None or (obj > best[1] if spherical else obj < best[1]):
            best = (cents, obj)
    labels, score = assign(x, best[0], chunk=chunk, spherical=spherical)
    return KMeansResult(np.asarray(best[0]), labels, float(score.astype(np.float64).sum()), best[1])
