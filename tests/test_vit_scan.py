"""The ViT's blocks under `nnx.scan`: the same numbers as calling the blocks one by one in a Python loop (the
forward before the scan), the per-block parameter layout of checkpoints and converters, one traced block."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util
from jax.extend.core import jaxprs_in_params

from neco_jax.models import VisionTransformer, get_arch

X = jnp.asarray(np.random.default_rng(0).standard_normal((3, 56, 56, 3)), jnp.float32)


def _loop_forward(model: VisionTransformer, x, *, key=None, return_attention=False, n_last_blocks=0) -> dict:
    """The blocks called one at a time, block i with its scheduled rate and PRNG stream fold_in(key, i)."""
    depth = len(model.blocks)
    tokens, outputs, attn = model._embed(x), [], None
    for i, block in enumerate(model.blocks):
        rate = model.drop_rates[i] if key is not None else 0.0
        block_key = jax.random.fold_in(key, i) if rate > 0 else None
        tokens, attn = block(
            tokens, drop_rate=rate, key=block_key, return_attention=return_attention and i == depth - 1
        )
        if i >= depth - n_last_blocks:
            outputs.append(model.norm(tokens))
    result = {"x_norm_patchtokens": model.norm(tokens)[:, 1:], "x_prenorm": tokens, "blocks": tuple(outputs)}
    if return_attention:
        result["attn_cls"] = attn[:, :, 1:]
    return result


@pytest.fixture(scope="module")
def depth3():
    """vit_tiny_test three blocks deep with NeCo's drop path schedule (rates 0, 0.05, float32(0.1)): in training
    blocks 0-1 run per-sample in one scan and block 2 batch-subset in its own."""
    return VisionTransformer(get_arch("vit_tiny_test", depth=3, drop_path_rate=0.1), rngs=nnx.Rngs(2))


def test_parameters_stay_per_block_and_a_pure_dict_restores_them(depth3):
    """The tree checkpoints and converters read is `blocks/{i}/...` with one block's shapes (nothing stacked);
    a pure dict of that layout (what checkpoints hold) loads into a fresh model with identical outputs."""
    pure = nnx.to_pure_dict(nnx.state(depth3))
    assert sorted(pure["blocks"]) == [0, 1, 2]
    block = traverse_util.flatten_dict(pure["blocks"][2], sep="/")
    expected = {
        "norm1/scale": (64,),
        "norm1/bias": (64,),
        "attn/qkv/kernel": (64, 192),
        "attn/qkv/bias": (192,),
        "attn/proj/kernel": (64, 64),
        "attn/proj/bias": (64,),
        "ls1/gamma": (64,),
        "norm2/scale": (64,),
        "norm2/bias": (64,),
        "mlp/fc1/kernel": (64, 256),
        "mlp/fc1/bias": (256,),
        "mlp/fc2/kernel": (256, 64),
        "mlp/fc2/bias": (64,),
        "ls2/gamma": (64,),
    }
    assert {k: v.shape for k, v in block.items()} == expected
    restored = nnx.eval_shape(lambda: VisionTransformer(depth3.config, rngs=nnx.Rngs(0)))
    state = nnx.state(restored)
    nnx.replace_by_pure_dict(state, jax.tree.map(np.asarray, pure))
    nnx.update(restored, state)
    forward = nnx.jit(lambda m: m(X)["x_prenorm"])
    np.testing.assert_array_equal(forward(restored), forward(depth3))


def test_inference_with_attention_and_last_blocks_equals_the_loop(depth3):
    """Blocks 0 and 1-2 in two scans, the latter returning their outputs and carrying the CLS attention."""
    kwargs = {"return_attention": True, "n_last_blocks": 2}
    scanned, loop = nnx.jit(lambda m: (m(X, **kwargs), _loop_forward(m, X, **kwargs)))(depth3)
    assert scanned["attn_cls"].shape == (3, 2, 16) and len(scanned["blocks"]) == 2
    for name in ("x_prenorm", "x_norm_patchtokens", "attn_cls", "blocks"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), scanned[name], loop[name])


@pytest.mark.slow
def test_training_outputs_and_gradients_equal_the_loop(depth3):
    """Drop path on (the same per-block PRNG streams and rates) and every block rematerialised in the scan: the
    loop's loss and gradients of every parameter (tests/test_remat.py: remat changes no number)."""
    graphdef, params = nnx.split(depth3)
    config = dataclasses.replace(depth3.config, remat=True)
    scanned_def = nnx.split(nnx.eval_shape(lambda: VisionTransformer(config, rngs=nnx.Rngs(0))))[0]
    key = jax.random.PRNGKey(3)

    def loss(forward):
        def value(p):
            out = forward(p)
            return jnp.sum(out["x_norm_patchtokens"] ** 2) + jnp.sum(out["x_prenorm"][:, 0])

        return jax.value_and_grad(value)

    @jax.jit
    def both(p):
        scanned = loss(lambda q: nnx.merge(scanned_def, q)(X, deterministic=False, key=key))(p)
        loop = loss(lambda q: _loop_forward(nnx.merge(graphdef, q), X, key=key))(p)
        return scanned, loop

    (v_scan, g_scan), (v_loop, g_loop) = both(params)
    np.testing.assert_allclose(v_scan, v_loop, rtol=1e-6)
    flat_scan, flat_loop = nnx.to_flat_state(g_scan), nnx.to_flat_state(g_loop)
    assert [p for p, _ in flat_scan] == [p for p, _ in flat_loop]
    for (path, a), (_, b) in zip(flat_scan, flat_loop):
        scale = float(np.abs(b[...]).max()) + 1e-30
        np.testing.assert_allclose(a[...], b[...], rtol=1e-5, atol=1e-6 * scale, err_msg="/".join(map(str, path)))


def _count(jaxpr, name: str) -> int:
    """Equations called `name` in a jaxpr, sub-jaxprs (scan bodies, remat) counted once each."""
    total = 0
    for eqn in jaxpr.eqns:
        total += eqn.primitive.name == name
        for sub in jaxprs_in_params(eqn.params):
            total += _count(sub, name)
    return total


def test_one_block_is_traced_whatever_the_depth():
    counts = {}
    for depth in (2, 6):
        config = get_arch("vit_tiny_test", depth=depth)
        graphdef, state = nnx.split(nnx.eval_shape(lambda c=config: VisionTransformer(c, rngs=nnx.Rngs(0))))
        jaxpr = jax.make_jaxpr(lambda s, g=graphdef: nnx.merge(g, s)(X)["x_prenorm"])(state).jaxpr
        counts[depth] = (_count(jaxpr, "dot_general"), _count(jaxpr, "scan"))
    assert counts[2] == counts[6] and counts[2][1] == 1
