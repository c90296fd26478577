"""NeCo projection head against a PyTorch Sequential + F.normalize, and its initial distribution."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from reference_models import relative_error

from neco_jax.l2_norm import l2_normalize
from neco_jax.models import ProjectionHead


def _torch_head(head: ProjectionHead) -> torch.nn.Sequential:
    """The original's head (Linear-GELU-Linear-GELU-Linear) holding our weights."""
    modules = []
    for i, layer in enumerate(head.layers):
        kernel = np.asarray(layer.kernel[...])
        linear = torch.nn.Linear(*kernel.shape)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(kernel.T.copy()))
            linear.bias.copy_(torch.from_numpy(np.array(layer.bias[...])))
        modules.append(linear)
        if i < len(head.layers) - 1:
            modules.append(torch.nn.GELU())
    return torch.nn.Sequential(*modules)


def test_matches_torch_and_is_unit_norm():
    head = ProjectionHead(48, hidden_dim=64, out_dim=32, rngs=nnx.Rngs(0))
    for layer in head.layers:  # non-zero biases so that they are exercised
        layer.bias.set_value(jnp.asarray(np.random.default_rng(1).standard_normal(layer.bias.shape), jnp.float32))
    x = np.random.default_rng(2).standard_normal((3, 5, 48)).astype(np.float32)
    with torch.no_grad():
        expected = F.normalize(_torch_head(head)(torch.from_numpy(x)), dim=-1).numpy()
    out = head(jnp.asarray(x))
    assert out.shape == (3, 5, 32) and out.dtype == jnp.float32
    assert relative_error(out, expected) <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, atol=1e-6)


def test_parameter_paths_and_default_sizes():
    head = nnx.eval_shape(lambda: ProjectionHead(384, rngs=nnx.Rngs(0)))
    shapes = {"/".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(head, nnx.Param))}
    assert shapes == {
        "layers/0/kernel": (384, 2048),
        "layers/0/bias": (2048,),
        "layers/1/kernel": (2048, 2048),
        "layers/1/bias": (2048,),
        "layers/2/kernel": (2048, 256),
        "layers/2/bias": (256,),
    }


def test_zero_vector_normalises_to_zero_like_torch():
    x = np.zeros((2, 4), np.float32)
    x[1] = [3.0, 0.0, 4.0, 0.0]
    expected = F.normalize(torch.from_numpy(x), dim=-1).numpy()
    np.testing.assert_array_equal(l2_normalize(jnp.asarray(x)), expected)


def test_init_is_plain_normal_std_002_with_zero_bias():
    """The original's trunc_normal_(std=.02) truncates at +-2 absolute, i.e. never: about 4.55% of weights
    lie beyond 2 sigma (a JAX truncated normal would put none there)."""
    head = ProjectionHead(384, rngs=nnx.Rngs(3))
    weights = np.asarray(head.layers[1].kernel[...]).ravel()
    assert weights.std() == pytest.approx(0.02, rel=0.01)
    assert abs(weights.mean()) < 1e-4
    assert np.mean(np.abs(weights) > 0.04) == pytest.approx(0.0455, abs=0.002)
    for layer in head.layers:
        assert not np.any(np.asarray(layer.bias[...]))
