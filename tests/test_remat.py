"""Rematerialised blocks (ViTConfig.remat) recompute the same numbers: outputs and gradients equal the
plain model's, with stochastic depth on (both drop-path variants) and off, with and without a policy of what the
backward pass may keep (ViTConfig.remat_policy)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from neco_jax.errors import ConfigError
from neco_jax.models import VisionTransformer, get_arch


def _loss_and_grads(remat: bool, x, key, policy: str = ""):
    # NeCo's student schedule: rates up to float32(0.1) > 0.1, so the last block takes the batch-subset path.
    arch = get_arch("vit_tiny_test", drop_path_rate=0.1, remat=remat, remat_policy=policy)
    model = VisionTransformer(arch, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)

    @jax.jit
    def run(params):
        def loss(p):
            out = nnx.merge(graphdef, p)(x, deterministic=False, key=key)
            return jnp.sum(out["x_norm_patchtokens"] ** 2) + jnp.sum(out["x_norm_clstoken"])

        return jax.value_and_grad(loss)(params)

    value, grads = run(params)
    return value, jax.tree.leaves(grads), str(jax.make_jaxpr(run)(params))


def test_remat_changes_no_number():
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 56, 56, 3))
    key = jax.random.PRNGKey(2)
    v0, g0, plain = _loss_and_grads(False, x, key)
    v1, g1, remat = _loss_and_grads(True, x, key)
    v2, g2, dots = _loss_and_grads(True, x, key, policy="dots_with_no_batch_dims_saveable")
    assert "remat" not in plain and remat.count("remat") >= 2  # one per block: remat really applied
    # the policy reaches every rematerialised block (printed as policy=None without one)
    assert "policy=None" in remat and "policy=None" not in dots and dots.count("policy=") == remat.count("policy=")
    for value, grads in ((v1, g1), (v2, g2)):
        np.testing.assert_allclose(value, v0, rtol=1e-6)
        assert len(g0) == len(grads)
        for a, b in zip(grads, g0):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7 * float(np.abs(b).max() + 1e-30))


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"remat": True, "remat_policy": "save_only_these_names"}, "remat_policy must be one of"),
        ({"remat_policy": "dots_saveable"}, "needs remat=True"),
    ],
)
def test_bad_remat_policy_is_named(fields, words):
    with pytest.raises(ConfigError, match=words):
        get_arch("vit_tiny_test", **fields)
