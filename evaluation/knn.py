"""Exact k-nearest-neighbour search by inner product, in JAX, with bounded device memory.

Why not ScaNN or faiss: both are awkward to install and ScaNN is approximate and CPU-only. A
brute-force search is exact, deterministic, needs no index build and is matmul-bound on an
accelerator. To keep device memory bounded, the keys are split over all devices (a 1-D mesh,
axis ``"data"``) and, on each device, into chunks of ``memory_chunk`` rows; a query block is
scored against one chunk at a time and a running top-k is merged after every chunk. The
per-device results are then gathered and merged once more.

Ranking and ties: results are ordered by score (descending), and equal scores by key index
(ascending). ``lax.top_k`` puts the lower index first among equal values; every merge
concatenates candidates in increasing key-index order, so the rule survives chunking and
sharding. A NumPy ``lexsort`` on ``(index, -score)`` gives the same answer.

Two selection methods, both exact:
- ``bin_size=0``: ``lax.top_k`` over every score of the chunk.
- ``bin_size=b``: the chunk's scores are cut into contiguous bins of ``b`` keys, the ``k`` bins
  with the highest maximum are kept and ``lax.top_k`` runs over their ``k*b`` scores only. Any
  bin holding one of the true top-k has a larger maximum (or an equal one at a lower bin index)
  than every bin that holds none, so no true neighbour is lost, and the tie rule is unchanged
  because the kept bins are re-sorted by position before the final selection.

Neighbour similarities for label transfer: ``cosine_similarities`` gathers the k keys of every
query on the device that holds them and recomputes the cosine in fp32 (as the reference, which
re-normalises query and keys), so bf16 ranking does not leak into the softmax weights.

Precision: ``dtype`` is the storage and matmul dtype of keys and queries; ``topk_dtype`` is the
dtype the scores are produced and ranked in (bf16 ranking is faster and has more ties; fp32
ranking of bf16 products is the usual compromise). Returned scores are fp32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from neco_jax.errors import ConfigError
from neco_jax.l2_norm import l2_normalize
from neco_jax.sharding import DATA_AXIS as AXIS
from neco_jax.sharding import make_mesh as data_mesh


@dataclasses.dataclass(frozen=True)
class ShardedKeys:
    """Keys placed on the devices: ``array`` is (num_devices * per_device, D), row-sharded.

    Rows at global position >= ``num_valid`` are padding and never returned.
    """

    array: jax.Array
    num_valid: int
    chunk: int
    mesh: jax.sharding.Mesh

    @property
    def dim(self) -> int:
        return int(self.array.shape[1])


def shard_keys(
    keys: np.ndarray | jax.Array,
    *,
    mesh: jax.sharding.Mesh | None = None,
    memory_chunk: int = 65536,
    dtype: str = "bfloat16",
    bin_size: int = 0,
    k: int,
) -> ShardedKeys:
    """Pads ``keys`` (M, D) and splits it over the mesh in chunks of at most ``memory_chunk`` rows.

    The chunk is shrunk for small memories (so tiny tests do not pad to 65,536 rows) and rounded
    up to a multiple of ``bin_size``; with bins, a chunk must hold at least ``k`` bins.
    """
    mesh = data_mesh() if mesh is None else mesh
    num_keys = keys.shape[0]
    ndev = mesh.devices.size
    chunk, per_device = key_layout(num_keys, ndev, memory_chunk=memory_chunk, bin_size=bin_size, k=k)
    padded = np.zeros((ndev * per_device, keys.shape[1]), dtype=jnp.dtype(dtype))
    padded[:num_keys] = np.asarray(keys).astype(jnp.dtype(dtype))
    array = jax.device_put(padded, NamedSharding(mesh, P(AXIS, None)))
    return ShardedKeys(array=array, num_valid=int(num_keys), chunk=int(chunk), mesh=mesh)


def key_layout(num_keys: int, num_devices: int, *, memory_chunk: int, bin_size: int, k: int) -> tuple[int, int]:
    """(keys per chunk, padded keys per device) of ``shard_keys``."""
    if num_keys < k:
        raise ConfigError(f"the memory holds {num_keys} keys but k={k}; use a larger memory or a smaller k")
    if memory_chunk <= 0 or bin_size < 0:
        raise ConfigError(f"memory_chunk must be > 0 and bin_size >= 0, got {memory_chunk} and {bin_size}")
    per_device = -(-num_keys // num_devices)
    chunk = min(memory_chunk, per_device)
    if bin_size:
        chunk = max(chunk, k * bin_size)
        chunk = -(-chunk // bin_size) * bin_size
    elif chunk < k:
        chunk = k
    return chunk, -(-per_device // chunk) * chunk


def _merge(scores_a, idx_a, scores_b, idx_b, k):
    """Top-k of two candidate lists; every index in ``a`` must be lower than every index in ``b``."""
    scores = jnp.concatenate([scores_a, scores_b], axis=-1)
    idx = jnp.concatenate([idx_a, idx_b], axis=-1)
    top, pos = jax.lax.top_k(scores, k)
    return top, jnp.take_along_axis(idx, pos, axis=-1)


def _chunk_topk(scores, k, bin_size):
    """Exact top-k positions of (Q, chunk) scores, ties to the lower position (see module doc)."""
    if not bin_size:
        return jax.lax.top_k(scores, k)
    q, chunk = scores.shape
    binned = scores.reshape(q, chunk // bin_size, bin_size)
    _, bins = jax.lax.top_k(binned.max(axis=-1), k)
    bins = jnp.sort(bins, axis=-1)
    cand = jnp.take_along_axis(binned, bins[:, :, None], axis=1).reshape(q, k * bin_size)
    cand_pos = (bins[:, :, None] * bin_size + jnp.arange(bin_size, dtype=bins.dtype)).reshape(q, k * bin_size)
    top, pos = jax.lax.top_k(cand, k)
    return top, jnp.take_along_axis(cand_pos, pos, axis=-1)


def _device_search(queries, keys, num_valid, *, k, chunk, topk_dtype, bin_size):
    """Top-k of ``queries`` against this device's key shard, then merged over all devices."""
    per_device, dim = keys.shape
    base = jax.lax.axis_index(AXIS) * per_device
    chunks = keys.reshape(per_device // chunk, chunk, dim)
    starts = base + jnp.arange(per_device // chunk, dtype=jnp.int32) * chunk
    queries = queries.astype(keys.dtype)
    neg_inf = jnp.array(-jnp.inf, topk_dtype)

    def step(carry, inp):
        best, best_idx = carry
        key_chunk, start = inp
        scores = jnp.dot(queries, key_chunk.T, preferred_element_type=topk_dtype)
        valid = start + jnp.arange(chunk, dtype=jnp.int32) < num_valid
        scores = jnp.where(valid[None, :], scores, neg_inf)
        top, pos = _chunk_topk(scores, k, bin_size)
        return _merge(best, best_idx, top, pos.astype(jnp.int32) + start, k), None

    init = (
        jnp.full((queries.shape[0], k), neg_inf, topk_dtype),
        jnp.full((queries.shape[0], k), jnp.iinfo(jnp.int32).max, jnp.int32),
    )
    (best, best_idx), _ = jax.lax.scan(step, init, (chunks, starts))
    all_best = jax.lax.all_gather(best, AXIS, axis=1, tiled=True)
    all_idx = jax.lax.all_gather(best_idx, AXIS, axis=1, tiled=True)
    top, pos = jax.lax.top_k(all_best, k)
    return top.astype(jnp.float32), jnp.take_along_axis(all_idx, pos, axis=-1)


@functools.cache
def _compiled_search(mesh, k, chunk, topk_dtype, bin_size):
    fn = functools.partial(_device_search, k=k, chunk=chunk, topk_dtype=jnp.dtype(topk_dtype), bin_size=bin_size)
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(AXIS, None), P()), out_specs=(P(), P()), check_vma=False)
    return jax.jit(mapped)


def _device_cosines(queries, keys, indices):
    """fp32 cosine of each query with its neighbours held on this device (0 elsewhere), summed over devices."""
    per_device = keys.shape[0]
    local = indices - jax.lax.axis_index(AXIS) * per_device
    mine = (local >= 0) & (local < per_device)
    neighbours = jnp.take(keys, jnp.clip(local, 0, per_device - 1), axis=0).astype(jnp.float32)
    cos = jnp.einsum("qd,qkd->qk", l2_normalize(queries.astype(jnp.float32)), l2_normalize(neighbours))
    cos = jnp.where(mine, cos, 0.0)
    return jax.lax.psum(cos, AXIS)


@functools.cache
def _compiled_cosines(mesh):
    mapped = jax.shard_map(
        _device_cosines, mesh=mesh, in_specs=(P(), P(AXIS, None), P()), out_specs=P(), check_vma=False
    )
    return jax.jit(mapped)


def cosine_similarities(store: ShardedKeys, queries: jax.Array, indices: jax.Array) -> jax.Array:
    """fp32 cosines (Q, k) between queries (Q, D) and the keys at ``indices`` (Q, k), computed where they live."""
    return _compiled_cosines(store.mesh)(jnp.asarray(queries), store.array, jnp.asarray(indices, jnp.int32))


def search_block(
    store: ShardedKeys,
    queries: jax.Array | np.ndarray,
    *,
    k: int,
    topk_dtype: str = "float32",
    bin_size: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Exact top-k keys of one query block (Q, D): fp32 scores (Q, k) and int32 key indices (Q, k)."""
    if bin_size and store.chunk % bin_size:
        raise ConfigError(f"bin_size {bin_size} must divide the key chunk {store.chunk}; build the keys with it")
    if queries.shape[-1] != store.dim:
        raise ConfigError(f"queries have dimension {queries.shape[-1]} but the keys have {store.dim}")
    search = _compiled_search(store.mesh, k, store.chunk, str(jnp.dtype(topk_dtype)), bin_size)
    return search(jnp.asarray(queries), store.array, jnp.int32(store.num_valid))


def knn(
    queries: np.ndarray,
    keys: np.ndarray,
    *,
    k: int,
    query_chunk: int = 4096,
    memory_chunk: int = 65536,
    dtype: str = "bfloat16",
    topk_dtype: str = "float32",
    bin_size: int = 0,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN by inner product over all queries, ``query_chunk`` queries at a time.

    Returns fp32 scores (Q, k) and int32 indices (Q, k) as NumPy arrays, ordered as the
    module doc says. Query blocks are zero-padded to one shape so the search compiles once.
    """
    store = shard_keys(keys, mesh=mesh, memory_chunk=memory_chunk, dtype=dtype, bin_size=bin_size, k=k)
    num_queries = queries.shape[0]
    block = min(query_chunk, num_queries)
    scores, indices = [], []
    for start in range(0, num_queries, block):
        part = np.asarray(queries[start : start + block])
        if part.shape[0] < block:
            part = np.concatenate([part, np.zeros((block - part.shape[0], part.shape[1]), part.dtype)])
        s, i = search_block(store, part, k=k, topk_dtype=topk_dtype, bin_size=bin_size)
        scores.append(s)
        indices.append(i)
    scores = np.concatenate([np.asarray(s) for s in scores])[:num_queries]
    indices = np.concatenate([np.asarray(i) for i in indices])[:num_queries]
    return scores, indices
