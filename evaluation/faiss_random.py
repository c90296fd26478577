"""faiss's random draws, reproduced: which rows its k-means and PCA train on, and where its k-means starts.

faiss's ``RandomGenerator`` is C++ ``std::mt19937`` (``faiss/utils/random.cpp`` in facebookresearch/faiss), whose
draws NumPy's legacy ``RandomState(seed)`` gives one for one: both seed with mt19937's ``init_genrand``, and
``randint`` over the whole uint32 range returns the raw outputs. On top of it, ``rand_perm`` is a Fisher-Yates
shuffle; faiss takes a prefix of it for its training subsamples (``Clustering``'s ``subsample_training_set``,
``fvecs_maybe_subsample`` for ``PCAMatrix``) and for k-means' starting rows.
"""

from __future__ import annotations

import numpy as np

# fvecs_maybe_subsample's default seed: the one PCAMatrix's subsample uses.
PCA_SUBSAMPLE_SEED = 1234


def mt19937_uint32(seed: int, count: int) -> np.ndarray:
    """The first ``count`` outputs of ``std::mt19937(seed)``; faiss passes the seed as an unsigned int (mod 2^32)."""
    return np.random.RandomState(seed % 2**32).randint(0, 2**32, size=count, dtype=np.uint32)


def rand_perm_prefix(n: int, seed: int, m: int) -> np.ndarray:
    """The first ``m`` entries of faiss's ``rand_perm(perm, n, seed)``: step i swaps i with i + draw_i % (n - i).

    Position i is final after step i, so ``m`` steps suffice; the positions moved so far are kept in a dict."""
    m = min(m, n)
    draws = mt19937_uint32(seed, min(m, max(n - 1, 0)))
    moved: dict[int, int] = {}
    out = np.empty(m, np.int64)
    for i in range(m):
        j = i + int(draws[i]) % (n - i) if i + 1 < n else i
        out[i] = moved.get(j, j)
        moved[j] = moved.get(i, i)
    return out
