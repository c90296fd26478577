"""Exact k-NN search and label transfer against NumPy / torch computations of the same quantities."""

import jax
import numpy as np
import pytest
import torch

from evaluation import knn as knn_lib
from evaluation.label_transfer import transfer_labels, upsample_labels
from neco_jax import errors


def brute_force(queries, keys, k):
    """Top-k by inner product, ties to the lower key index (the documented order)."""
    scores = queries.astype(np.float64) @ keys.astype(np.float64).T
    order = np.stack([np.lexsort((np.arange(len(row)), -row))[:k] for row in scores])
    return np.take_along_axis(scores, order, axis=1), order


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((37, 16)).astype(np.float32), rng.standard_normal((1001, 16)).astype(np.float32)


@pytest.mark.parametrize(
    "memory_chunk,bin_size,query_chunk",
    [
        (64, 0, 16),  # 1001 keys over 4 devices: 251 per device -> 4 chunks, the last one mostly padding
        (4096, 0, 37),  # one chunk per device
        (64, 8, 16),  # bin prefilter; chunk grows to k * bin_size = 240
    ],
)
def test_knn_matches_brute_force(data, memory_chunk, bin_size, query_chunk):
    queries, keys = data
    assert jax.device_count() == 4  # conftest: the search is sharded over 4 simulated devices
    scores, idx = knn_lib.knn(
        queries,
        keys,
        k=30,
        query_chunk=query_chunk,
        memory_chunk=memory_chunk,
        dtype="float32",
        topk_dtype="float32",
        bin_size=bin_size,
    )
    ref_scores, ref_idx = brute_force(queries, keys, 30)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,topk_dtype,bin_size", [("float32", "float32", 0), ("bfloat16", "bfloat16", 4)])
def test_knn_ties_go_to_the_lower_index(dtype, topk_dtype, bin_size):
    # Small integers: every score is exact (also in bf16), and most scores tie with many others.
    rng = np.random.default_rng(1)
    queries = rng.integers(-1, 2, size=(9, 8)).astype(np.float32)
    keys = rng.integers(-1, 2, size=(300, 8)).astype(np.float32)
    keys[150:] = keys[:150]  # exact duplicates across chunk and device boundaries
    scores, idx = knn_lib.knn(
        queries, keys, k=30, memory_chunk=32, dtype=dtype, topk_dtype=topk_dtype, bin_size=bin_size
    )
    ref_scores, ref_idx = brute_force(queries, keys, 30)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(scores, ref_scores)


def test_knn_single_device_mesh(data):
    queries, keys = data
    mesh = knn_lib.data_mesh()
    one = jax.sharding.Mesh(mesh.devices[:1], mesh.axis_names)
    _, idx = knn_lib.knn(queries, keys, k=30, memory_chunk=128, dtype="float32", mesh=one)
    np.testing.assert_array_equal(idx, brute_force(queries, keys, 30)[1])


def test_bf16_keys_with_fp32_ranking_rank_the_rounded_keys_exactly():
    rng = np.random.default_rng(2)
    queries = rng.standard_normal((11, 16)).astype(np.float32)
    keys = rng.standard_normal((500, 16)).astype(np.float32)
    bf16 = lambda x: np.asarray(x.astype(jax.numpy.bfloat16)).astype(np.float32)  # noqa: E731
    _, idx = knn_lib.knn(queries, keys, k=30, memory_chunk=64, dtype="bfloat16", topk_dtype="float32")
    ref_scores, ref_idx = brute_force(bf16(queries), bf16(keys), 30)
    # Products of bf16 numbers are exact in fp32; only the summation order can flip a near-tie.
    gaps = np.abs(np.diff(ref_scores, axis=1)).min(axis=1)
    clear = gaps > 1e-4
    assert clear.sum() >= 5
    np.testing.assert_array_equal(idx[clear], ref_idx[clear])


def test_cosine_similarities_of_gathered_neighbours(data):
    queries, keys = data
    store = knn_lib.shard_keys(keys, memory_chunk=64, dtype="float32", k=30)
    _, idx = knn_lib.search_block(store, queries, k=30)
    cos = np.asarray(knn_lib.cosine_similarities(store, queries, idx))
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    kn = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    ref = np.einsum("qd,qkd->qk", q, kn[np.asarray(idx)])
    np.testing.assert_allclose(cos, ref, rtol=1e-5, atol=1e-6)


def test_label_transfer_matches_the_reference_cross_attention(data):
    queries, keys = data
    rng = np.random.default_rng(3)
    labels = rng.dirichlet(np.ones(5), size=len(keys)).astype(np.float32)
    store = knn_lib.shard_keys(keys, memory_chunk=64, dtype="float32", k=30)
    _, idx = knn_lib.search_block(store, queries, k=30)
    idx = np.asarray(idx)
    soft = transfer_labels(knn_lib.cosine_similarities(store, queries, idx), labels[idx], temperature=0.02)
    # NumPy version of open-hummingbird-eval's cross_attention(q, k, v, beta=0.02).
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    k = keys[idx] / np.linalg.norm(keys[idx], axis=2, keepdims=True)
    logits = np.einsum("qd,qkd->qk", q.astype(np.float64), k) / 0.02
    attn = np.exp(logits - logits.max(axis=1, keepdims=True))
    attn /= attn.sum(axis=1, keepdims=True)
    ref = np.einsum("qk,qkc->qc", attn, labels[idx])
    np.testing.assert_allclose(np.asarray(soft), ref, rtol=1e-5, atol=1e-6)


def test_upsampling_matches_torch_bilinear():
    x = np.random.default_rng(4).random((2, 6, 6, 3)).astype(np.float32)
    out = np.asarray(upsample_labels(jax.numpy.asarray(x), (84, 84)))
    ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(84, 84), mode="bilinear")
    np.testing.assert_allclose(out, ref.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-6)


def test_k_larger_than_the_memory_is_a_user_error(data):
    queries, keys = data
    with pytest.raises(errors.ConfigError, match="k=30"):
        knn_lib.knn(queries, keys[:20], k=30)


@pytest.mark.gpu
@pytest.mark.parametrize("bin_size", [0, 128])
def test_knn_on_the_accelerator_matches_brute_force_with_ties(bin_size):
    # The tie rule relies on lax.top_k putting the lower index first, which the accelerator's top-k must honour.
    rng = np.random.default_rng(6)
    queries = rng.integers(-2, 3, size=(257, 32)).astype(np.float32)
    keys = rng.integers(-2, 3, size=(200_003, 32)).astype(np.float32)
    keys[100_000:100_500] = keys[:500]
    scores, idx = knn_lib.knn(
        queries,
        keys,
        k=30,
        query_chunk=128,
        memory_chunk=16384,
        dtype="bfloat16",
        topk_dtype="float32",
        bin_size=bin_size,
    )
    ref_scores, ref_idx = brute_force(queries, keys, 30)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(scores, ref_scores)
