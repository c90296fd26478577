"""Sorting networks vs diffsort 0.2.0 (the package NeCo pins): networks, P, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffsort import DiffSortNet
from diffsort.networks import bitonic_network, odd_even_network

from neco_jax import errors, sorting

SIZES = (2, 5, 16, 49, 64)
NETWORKS = ("bitonic", "odd_even")
ROWS = 4
# float32 vs diffsort in float64, relative to the largest entry: the worst measured on the CPU over the relaxations,
# for n <= 16 and for n in {49, 64} (diffsort's own float32 run, for scale: up to 5.8e-5 on P, 7.3e-4 on grad P).
# The bounds are 3x these.
MEASURED = {
    "bitonic": {
        "P": (1.2e-6, 1.5e-5),
        "values": (2.1e-7, 5.0e-7),
        "grad P": (3.3e-6, 6.1e-5),
        "grad values": (9.4e-7, 3.7e-6),
    },
    "odd_even": {
        "P": (2.1e-6, 3.6e-5),
        "values": (2.5e-7, 1.9e-6),
        "grad P": (5.8e-6, 1.9e-4),
        "grad values": (1.3e-6, 1.5e-4),
    },
}
MARGIN = 3


def _inputs(n, seed):
    """Well-separated values (gaps >= 0.5 / n) in random order: keeps fp32 conditioning comparable across libraries."""
    rng = np.random.default_rng(seed)
    x = np.stack([rng.permutation(n) for _ in range(ROWS)]).astype(np.float64) / n
    x += rng.uniform(0, 0.5 / n, x.shape)
    weights = rng.normal(size=(ROWS, n, n))
    return x, weights


def _diffsort(x, weights, network, steepness, distribution, dtype):
    """diffsort's P, values and the gradients of sum(w * P) and sum(values**2) with respect to x."""
    xt = torch.tensor(x, dtype=dtype, requires_grad=True)
    sorter = DiffSortNet(network, x.shape[1], steepness=steepness, distribution=distribution)
    sorter.sorting_network = [[m.to(dtype) for m in layer] for layer in sorter.sorting_network]
    values, perm = sorter(xt)
    (gp,) = torch.autograd.grad((perm * torch.tensor(weights, dtype=dtype)).sum(), xt, retain_graph=True)
    (gv,) = torch.autograd.grad((values**2).sum(), xt)
    return [t.detach().numpy() for t in (perm, values, gp, gv)]


def _ours(x, weights, network, steepness):
    """{relaxation: [P, values, grad P, grad values]} as `_diffsort` gives them, every relaxation in one program
    (one compilation instead of six; the same numbers bit for bit)."""

    def one(x, distribution):
        def outputs(x):
            values, perm = sorting.sort(x, network=network, steepness=steepness, distribution=distribution)
            return perm, values

        gp = jax.grad(lambda x: jnp.sum(outputs(x)[0] * weights))(x)
        gv = jax.grad(lambda x: jnp.sum(outputs(x)[1] ** 2))(x)
        return (*outputs(x), gp, gv)

    everything = jax.jit(lambda x: {d: one(x, d) for d in sorting.DISTRIBUTIONS})
    return {d: [np.asarray(t) for t in out] for d, out in everything(x).items()}


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("n", range(1, 70))
def test_networks_equal_diffsort_matrices(n):
    for network, reference in (("bitonic", bitonic_network), ("odd_even", odd_even_network)):
        if n == 1 and network == "bitonic":
            continue  # diffsort's bitonic builder has no layers for n = 1 either (log2(1) = 0 blocks)
        ours, theirs = sorting.network_matrices(network, n), reference(n)
        assert len(ours) == len(theirs)
        for layer_ours, layer_theirs in zip(ours, theirs):
            for a, b in zip(layer_ours, layer_theirs):
                assert a.shape == b.shape and np.array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("n", SIZES)
def test_sort_equals_diffsort(n, network):
    """Every relaxation: P, values and the gradients of both against diffsort in float64, within 3x the worst
    error measured for this network and size class (`MEASURED`)."""
    x, weights = _inputs(n, seed=n)
    x32, w32 = x.astype(np.float32), weights.astype(np.float32)
    x64, w64 = x32.astype(np.float64), w32.astype(np.float64)
    steepness = 2.0 * n  # swaps of neighbours with gap ~1/n are decided but still soft
    ours = _ours(x32, w32, network, steepness)
    for distribution in sorting.DISTRIBUTIONS:
        ref = _diffsort(x64, w64, network, steepness, distribution, torch.float64)
        for name, o, r in zip(("P", "values", "grad P", "grad values"), ours[distribution], ref):
            err, bound = _rel(o, r), MARGIN * MEASURED[network][name][n > 16]
            print(f"{network} n={n} {distribution} {name}: {err:.2e}")
            assert err <= bound, (distribution, name, err, bound)


@pytest.mark.parametrize("network", NETWORKS)
def test_gather_is_diffsort_in_float64(network):
    """The algorithm itself, without float32 rounding: the executors equal diffsort in float64 (measured: P 2.0e-14,
    values 1.5e-15; bounds 3x)."""
    x, _ = _inputs(49, seed=7)
    x = np.random.default_rng(0).normal(size=x.shape) * 0.3
    runs = (sorting._execute_gather, sorting._execute_dense)
    with jax.enable_x64(True):  # every executor and relaxation in one program
        ours = jax.jit(
            lambda x: {(r.__name__, d): r(x, network, 100.0, d, 0.25) for r in runs for d in sorting.DISTRIBUTIONS}
        )
        ours = jax.device_get(ours(jnp.asarray(x, jnp.float64)))
    for distribution in sorting.DISTRIBUTIONS:
        ref_p, ref_v = _diffsort(x, np.zeros((ROWS, 49, 49)), network, 100.0, distribution, torch.float64)[:2]
        for run in runs:
            values, perm = ours[run.__name__, distribution]
            assert perm.dtype == values.dtype == np.float64
            assert _rel(perm, ref_p) <= 6e-14, (distribution, run.__name__)
            assert _rel(values, ref_v) <= 5e-15


@pytest.mark.parametrize("network", NETWORKS)
def test_hard_limit_sorts_and_p_is_doubly_stochastic(network):
    x = np.random.default_rng(1).normal(size=(50, 49)).astype(np.float32)
    values, perm = jax.jit(lambda x: sorting.sort(x, network=network, steepness=1e6))(x)
    # Cauchy's heavy tail leaves ~1/(pi * 1e6) of each swap undone: equal within 1e-5 of the value range.
    np.testing.assert_allclose(np.asarray(values), np.sort(x, axis=-1), rtol=0, atol=1e-5 * np.abs(x).max())
    _, soft = sorting.sort(x, network=network, steepness=10.0)
    np.testing.assert_allclose(np.asarray(soft).sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(soft).sum(-2), 1.0, atol=1e-5)


def test_float32_batching_and_vmap():
    x = np.random.default_rng(2).normal(size=(2, 3, 16)).astype(np.float16)
    values, perm = sorting.sort(x)
    assert values.dtype == jnp.float32 and perm.shape == (2, 3, 16, 16)
    v2, p2 = jax.vmap(lambda r: sorting.sort(r))(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(p2), np.asarray(perm), atol=1e-7)


def test_unknown_names_raise_user_errors():
    with pytest.raises(errors.ConfigError, match="network"):
        sorting.sort(np.zeros((1, 4)), network="merge")
    with pytest.raises(errors.ConfigError, match="relaxation"):
        sorting.sort(np.zeros((1, 4)), distribution="softmax")
