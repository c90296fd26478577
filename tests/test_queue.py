"""FIFO reference queue: push order and size, counters (correct and the original's), sampling rule."""

import jax
import numpy as np
import pytest

from neco_jax import errors
from neco_jax import queue as queue_lib

B, A, H, D, LENGTH = 4, 2, 4, 5, 100  # 10*B = 40 of 64 vectors per push; full after 3 pushes


def _teacher(step):
    """Vectors whose first coordinate encodes (step, anchor, image, cell) so pushes can be traced."""
    ids = np.arange(B * A * H * H, dtype=np.float32).reshape(A, B, H, H).transpose(1, 0, 2, 3) + 1000 * (step + 1)
    return np.repeat(ids[..., None], D, axis=-1)


@pytest.mark.parametrize("original_counter", [False, True])
def test_push_fifo_and_counters(original_counter):
    state = queue_lib.init(A, LENGTH, D)
    push = jax.jit(lambda s, t, k: queue_lib.push(s, t, k, original_counter=original_counter))
    history = [[] for _ in range(A)]
    for step in range(4):
        teacher = _teacher(step)
        state = push(state, teacher, jax.random.PRNGKey(step))
        vec = np.asarray(state.vectors)
        for a in range(A):
            fresh = vec[a, :40, 0]
            pool = teacher[:, a, ..., 0].reshape(-1)
            assert len(set(fresh.tolist())) == 40 and set(fresh.tolist()) <= set(pool.tolist())  # no replacement
            history[a] = (fresh.tolist() + history[a])[:LENGTH]
            filled_real = min(40 * (step + 1), LENGTH)
            np.testing.assert_array_equal(vec[a, :filled_real, 0], history[a][:filled_real])
            assert (vec[a, filled_real:] == 0).all()
        expected = min(40 * A * (step + 1), LENGTH) if original_counter else min(40 * (step + 1), LENGTH)
        assert np.asarray(state.filled).tolist() == [expected] * A


def test_sample_rule_in_first_steps():
    state = queue_lib.init(A, LENGTH, D)
    state = queue_lib.push(state, _teacher(0), jax.random.PRNGKey(0), original_counter=True)
    key = jax.random.PRNGKey(9)
    refs = np.asarray(queue_lib.sample(state, 1, 36, key))
    index = np.asarray(jax.random.permutation(key, LENGTH))[:36] % 80  # original counter: 2 * 40
    np.testing.assert_array_equal(refs, np.asarray(state.vectors)[1, index])
    assert (refs[index >= 40] == 0).all() and (refs[index < 40] != 0).all()  # never-written slots are zeros
    correct = queue_lib.push(queue_lib.init(A, LENGTH, D), _teacher(0), jax.random.PRNGKey(0))
    refs = np.asarray(queue_lib.sample(correct, 0, 36, key))
    assert (refs != 0).all()


def test_masked_push_and_errors():
    valid = np.zeros((B, A, H, H), bool)
    valid[0, :, 0, :2] = True  # only 2 valid vectors per anchor
    state = queue_lib.push(queue_lib.init(A, LENGTH, D), _teacher(0), jax.random.PRNGKey(0), valid=valid)
    assert np.asarray(state.filled).tolist() == [2, 2]
    vec = np.asarray(state.vectors)
    assert set(vec[0, :2, 0].tolist()) == set(_teacher(0)[0, 0, 0, :2, 0].tolist()) and (vec[0, 2:] == 0).all()
    with pytest.raises(errors.ConfigError):
        queue_lib.sample(state, 0, LENGTH + 1, jax.random.PRNGKey(0))
    with pytest.raises(errors.ConfigError):
        queue_lib.init(A, 0, D)
