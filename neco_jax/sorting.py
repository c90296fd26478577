"""Differentiable sorting networks (Petersen et al.), numerically equal to diffsort 0.2.0.

NeCo sorts 49 reference similarities per query patch with ``diffsort.DiffSortNet``. To reproduce its
relaxed permutation matrices we rebuild exactly the same networks (same wire padding for n that is not
a power of two, same dropped and identity comparators) and apply the same relaxed conditional swaps.

Convention (diffsort's): ``P[..., i, j]`` is the probability that input ``i`` lands at rank ``j``;
sorting is ascending and ``x_sorted = x @ P``.

The default executor reads each layer as static gather tables (for every wire: the wire it meets in
that layer and which of the two swap weights it keeps), which is O(n^2) work per layer per row instead
of diffsort's dense n x n matmuls; the layers run as a scan over the stacked tables.
``executor="dense"`` runs diffsort's matrix form for comparison and benchmarks. Everything runs in float32 whatever the input dtype, since a product of tens of relaxed
swaps underflows in bfloat16.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from neco_jax.errors import ConfigError
from neco_jax.settings import DISTRIBUTIONS, NETWORKS

EXECUTORS = ("gather", "dense")

# A comparator: input wires (a, b) and the wires receiving the min and the max.
# An identity comparator (a == b) passes one wire through; diffsort writes it with 0.5/0.5 weights.
Comparator = tuple[int, int, int, int]


def bitonic_comparators(n: int) -> list[list[Comparator]]:
    """Layers of the bitonic network on n wires, as diffsort 0.2.0 builds them.

    The network runs on m = 2**ceil(log2 n) wires; the m - n lowest padded wires are discarded, so real
    input i sits on padded wire i + (m - n). A comparator touching two discarded wires is dropped; one
    touching exactly one discarded wire becomes an identity on the real wire.
    """
    num_blocks = (n - 1).bit_length()
    wires = 1 << num_blocks
    pad = wires - n
    layers = []
    for block in range(num_blocks):
        for layer in range(block + 1):
            stride = 1 << (block - layer)
            comps: list[Comparator] = []
            for start in range(0, wires, 2 * stride):
                for j in range(stride):
                    a, b = start + j, start + j + stride
                    real_a, real_b = a >= pad, b >= pad
                    if real_a and real_b:
                        descending = (a >> (block + 1)) & 1
                        lo, hi = (b, a) if descending else (a, b)
                        comps.append((a - pad, b - pad, lo - pad, hi - pad))
                    elif real_a or real_b:
                        w = (a if real_a else b) - pad
                        comps.append((w, w, w, w))
            layers.append(comps)
    return layers


def odd_even_comparators(n: int) -> list[list[Comparator]]:
    """Layers of the odd-even transposition network, as diffsort 0.2.0 builds them (n layers).

    Layers alternate between pairs starting at wire 0 and at wire 1; wires left without a partner get an
    identity comparator, listed after the pairs in increasing wire order.
    """
    layers = []
    for layer in range(n):
        first = layer % 2
        comps: list[Comparator] = [(i, i + 1, i, i + 1) for i in range(first, n - 1, 2)]
        paired = {w for c in comps for w in c[:2]}
        comps += [(w, w, w, w) for w in range(n) if w not in paired]
        layers.append(comps)
    return layers


def comparators(network: str, n: int) -> list[list[Comparator]]:
    """The comparator layers of ``network`` on n wires."""
    if network == "bitonic":
        return bitonic_comparators(n)
    if network == "odd_even":
        return odd_even_comparators(n)
    raise ConfigError(f"unknown sorting network {network!r}; use one of {NETWORKS}")


def network_matrices(network: str, n: int) -> list[tuple[np.ndarray, ...]]:
    """diffsort's matrix form of each layer: (split_a (k,n), split_b (k,n), combine_min (n,k), combine_max (n,k))."""
    out = []
    for comps in comparators(network, n):
        k = len(comps)
        split_a, split_b = np.zeros((k, n)), np.zeros((k, n))
        combine_min, combine_max = np.zeros((n, k)), np.zeros((n, k))
        for c, (a, b, lo, hi) in enumerate(comps):
            split_a[c, a] = split_b[c, b] = 1.0
            weight = 0.5 if a == b else 1.0
            combine_min[lo, c] = combine_max[hi, c] = weight
        out.append((split_a, split_b, combine_min, combine_max))
    return out


class GatherTables(NamedTuple):
    """All layers of a network as stacked per-wire tables, shape (layers, n).

    Wire w of a layer meets ``partner[w]`` (itself for an identity comparator). ``sign[w]`` is +1 if w is the
    comparator's first input a and -1 if it is b, so that ``sign * (x[partner] - x) = x_b - x_a``;
    ``keeps_alpha[w]`` says w's own weight is alpha (w is a and takes the min, or w is b and takes the max).
    """

    partner: np.ndarray  # int32, an involution per layer
    sign: np.ndarray  # float32, +1 / -1
    keeps_alpha: np.ndarray  # bool


@functools.cache
def gather_tables(network: str, n: int) -> GatherTables:
    """Static gather tables of every layer (cached per network and size)."""
    layers = comparators(network, n)
    partner = np.full((len(layers), n), -1, np.int32)
    sign = np.zeros((len(layers), n), np.float32)
    keeps_alpha = np.zeros((len(layers), n), bool)
    for i, comps in enumerate(layers):
        for a, b, lo, hi in comps:
            partner[i, a], partner[i, b] = b, a
            sign[i, b], sign[i, a] = -1.0, 1.0
            keeps_alpha[i, a] = a == lo
            keeps_alpha[i, b] = b == hi or a == b
    assert (partner >= 0).all(), "every wire must be written by exactly one comparator"
    return GatherTables(partner, sign, keeps_alpha)


@jax.custom_vjp
def _take_wires(x: jax.Array, perm: jax.Array) -> jax.Array:
    """x[:, perm] for an involutive permutation (its own inverse).

    The custom VJP makes the backward pass the same gather instead of a scatter-add.
    """
    return jnp.take(x, perm, axis=1)


def _take_wires_fwd(x, perm):
    return _take_wires(x, perm), perm


def _take_wires_bwd(perm, grad):
    return _take_wires(grad, perm), None


_take_wires.defvjp(_take_wires_fwd, _take_wires_bwd)


def swap_probability(diff: jax.Array, steepness, distribution: str, art_lambda: float) -> jax.Array:
    """alpha(x_b - x_a): the weight of x_a in the relaxed min, written as diffsort computes it."""
    if distribution == "cauchy":
        return (1.0 / math.pi) * jnp.arctan(steepness * diff) + 0.5
    if distribution == "logistic":
        return jax.nn.sigmoid(diff * steepness)
    if distribution == "logistic_phi":
        return jax.nn.sigmoid(diff * steepness / (jnp.abs(diff) + 1e-10) ** art_lambda)
    if distribution == "gaussian":
        sigma = 1.0 / steepness
        return 0.5 + 0.5 * jax.lax.erf(diff / sigma / math.sqrt(2.0))
    if distribution == "reciprocal":
        v = steepness * diff
        return 0.5 * (v / (2.0 + jnp.abs(v)) + 1.0)
    if distribution == "optimal":
        v = steepness * diff
        outside = (v > 0.25).astype(v.dtype) - (v < -0.25).astype(v.dtype)
        return jnp.clip(v, -0.25, 0.25) + 0.5 + outside * (0.25 - 1.0 / 16.0 / (jnp.abs(v) + 1e-10))
    raise ConfigError(f"unknown relaxation {distribution!r}; use one of {DISTRIBUTIONS}")


def _execute_gather(x: jax.Array, network: str, steepness, distribution: str, art_lambda: float):
    """Gather executor on rows x (R, n). P is kept transposed, (R, wire, input), so a gather moves whole rows.

    Per wire: out = c_self * in[w] + c_partner * in[partner[w]] with diffsort's weights (alpha, 1 - alpha) of
    the comparator's (a, b) inputs; floating-point + and * commute, so this is diffsort's arithmetic.
    The layers run as a ``lax.scan`` over the stacked tables: unrolled, XLA fuses the chain of cheap
    elementwise layers into quadratically large kernels (25-50 s to compile a 49-layer forward on CPU).
    Each layer is rematerialised in the backward pass, so only P per layer is kept (half the memory).
    """
    rows, n = x.shape
    tables = gather_tables(network, n)
    pt = jnp.broadcast_to(jnp.eye(n, dtype=x.dtype), (rows, n, n))

    def layer(carry, table):
        x, pt = carry
        partner, sign, keeps_alpha = table
        x_partner = _take_wires(x, partner)
        alpha = swap_probability(sign * (x_partner - x), steepness, distribution, art_lambda)
        beta = 1.0 - alpha
        c_self = jnp.where(keeps_alpha, alpha, beta)
        c_partner = jnp.where(keeps_alpha, beta, alpha)
        x = c_self * x + c_partner * x_partner
        pt = c_self[:, :, None] * pt + c_partner[:, :, None] * _take_wires(pt, partner)
        return (x, pt), None

    if len(tables.partner):
        (x, pt), _ = jax.lax.scan(jax.checkpoint(layer), (x, pt), tuple(jnp.asarray(t) for t in tables))
    return x, jnp.swapaxes(pt, -1, -2)


def _execute_dense(x: jax.Array, network: str, steepness, distribution: str, art_lambda: float):
    """diffsort's matrix form (four matmuls per layer, at full float32 precision), scanned over layers.

    Layers are zero-padded to the widest one; a zero comparator column contributes exact zeros.
    """
    mm = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
    rows, n = x.shape
    layers = network_matrices(network, n)
    p = jnp.broadcast_to(jnp.eye(n, dtype=x.dtype), (rows, n, n))
    if not layers:
        return x, p
    k = max(m[0].shape[0] for m in layers)
    pad_rows = lambda m: np.pad(m, ((0, k - m.shape[0]), (0, 0)))  # noqa: E731
    # Stacked (layers, n, k) matrices: x @ split.T gathers the comparator inputs, y @ combine.T scatters.
    split_a, split_b, combine_min, combine_max = (
        np.stack([pad_rows(m[i] if i < 2 else m[i].T).T for m in layers]).astype(np.float32) for i in range(4)
    )

    def layer(carry, mats):
        x, p = carry
        sa, sb, cmin, cmax = mats
        a, b = mm(x, sa), mm(x, sb)
        alpha = swap_probability(b - a, steepness, distribution, art_lambda)
        pa, pb = mm(p, sa), mm(p, sb)
        w_min = alpha[:, None, :] * pa + (1 - alpha)[:, None, :] * pb
        w_max = (1 - alpha)[:, None, :] * pa + alpha[:, None, :] * pb
        p = mm(w_max, cmax.T) + mm(w_min, cmin.T)
        x = mm(alpha * a + (1 - alpha) * b, cmin.T) + mm((1 - alpha) * a + alpha * b, cmax.T)
        return (x, p), None

    mats = (split_a, split_b, combine_min, combine_max)
    (x, p), _ = jax.lax.scan(layer, (x, p), tuple(jnp.asarray(m) for m in mats))
    return x, p


def sort(
    x: jax.Array,
    *,
    network: str = "bitonic",
    steepness: float = 10.0,
    distribution: str = "cauchy",
    art_lambda: float = 0.25,
    executor: str = "gather",
) -> tuple[jax.Array, jax.Array]:
    """Relaxed ascending sort of the last axis.

    Args:
      x: (..., n) values; computed in float32 whatever their dtype.
      network: "bitonic" or "odd_even" (diffsort's networks, any n).
      steepness: inverse temperature of the relaxed swaps (a float or a traced scalar).
      distribution: cauchy | logistic | logistic_phi | gaussian | reciprocal | optimal.
      art_lambda: exponent of logistic_phi (ignored by the others).
      executor: "gather" (static gather tables, O(n^2) per layer per row) or "dense" (diffsort's matmuls).

    Returns:
      (x_sorted (..., n), P (..., n, n)) in float32 with P[..., i, j] = P(input i at rank j).
    """
    if network not in NETWORKS:
        raise ConfigError(f"unknown sorting network {network!r}; use one of {NETWORKS}")
    if distribution not in DISTRIBUTIONS:
        raise ConfigError(f"unknown relaxation {distribution!r}; use one of {DISTRIBUTIONS}")
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown sort executor {executor!r}; use one of {EXECUTORS}")
    x = jnp.asarray(x, jnp.float32)
    *batch, n = x.shape
    run = _execute_gather if executor == "gather" else _execute_dense
    values, perm = run(x.reshape(-1, n), network, steepness, distribution, art_lambda)
    return values.reshape(*batch, n), perm.reshape(*batch, n, n)
