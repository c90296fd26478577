"""EMA teacher: the cosine momentum schedule and the update, against NumPy float64 references."""

import jax
import jax.numpy as jnp
import numpy as np

from neco_jax import ema


def _np_momentum(start, end, total):
    """experiments/utils.py::cosine_scheduler in float64."""
    it = np.arange(total)
    return end + 0.5 * (start - end) * (1 + np.cos(np.pi * it / total))


def test_rate_schedule_matches_the_original_momentum():
    total = 46_200
    steps = np.arange(0, total, 7)
    m_ref = _np_momentum(0.9995, 1.0, total)[steps]
    rate = np.asarray(jax.vmap(ema.ema_rate_schedule(0.9995, 1.0, total))(steps), np.float64)
    # The complement is what enters the update; compare it relative to itself, not to ~1.
    np.testing.assert_allclose(rate, 1.0 - m_ref, rtol=2e-6, atol=1e-12)
    assert rate[0] == np.float32(0.0005)
    assert np.all(np.diff(rate) <= 0) and rate[-1] > 0  # momentum rises but never reaches 1.0
    assert rate[-1] < rate[len(rate) // 2] < rate[0]  # momentum rises but never reaches 1.0


def test_update_matches_float64_formula():
    rng = np.random.default_rng(0)
    t = {"a": rng.normal(size=(5, 3)).astype(np.float32), "b": {"c": rng.normal(size=(7,)).astype(np.float32)}}
    s = jax.tree.map(lambda x: (x + rng.normal(size=x.shape)).astype(np.float32), t)
    m = 0.9995
    got = ema.ema_update(jax.tree.map(jnp.asarray, t), jax.tree.map(jnp.asarray, s), jnp.float32(1 - m))
    ref = jax.tree.map(lambda a, b: m * a.astype(np.float64) + (1 - m) * b.astype(np.float64), t, s)
    for g, r, a in zip(jax.tree.leaves(got), jax.tree.leaves(ref), jax.tree.leaves(t)):
        assert g.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(g, np.float64), r, rtol=1e-6, atol=1e-7)
        # and the teacher really moved towards the student by (1 - m) of the gap
        np.testing.assert_allclose(np.asarray(g) - a, (r - a), rtol=1e-2, atol=1e-7)


def test_rate_one_copies_student_and_zero_keeps_teacher():
    t, s = {"w": jnp.ones(4)}, {"w": jnp.full(4, 3.0)}
    assert np.array_equal(ema.ema_update(t, s, jnp.float32(1.0))["w"], s["w"])
    assert np.array_equal(ema.ema_update(t, s, jnp.float32(0.0))["w"], t["w"])
