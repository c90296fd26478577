"""Rematerialised blocks (ViTConfig.remat) recompute the same numbers: outputs and gradients equal the
plain model's, with stochastic depth on (both drop-path variants) and off."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neco_jax.models import VisionTransformer, get_arch


def _loss_and_grads(remat: bool, x, key):
    # NeCo's student schedule: rates up to float32(0.1) > 0.1, so the last block takes the batch-subset path.
    model = VisionTransformer(get_arch("vit_tiny_test", drop_path_rate=0.1, remat=remat), rngs=nnx.Rngs(0))
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
    assert "remat" not in plain and remat.count("remat") >= 2  # one per block: remat really applied
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    assert len(g0) == len(g1)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7 * float(np.abs(b).max() + 1e-30))
