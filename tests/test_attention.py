"""The memory-efficient attention (neco_jax/models/attention.py) against the plain softmax path (XLA's, which
keeps the scores), fp32: outputs and gradients within 3x the relative error (max-norm) measured on the CPU, for
the kernel alone and inside the ViT; the backward pass keeps no N x N array; "auto" chooses by platform and dtype; cuDNN falls
back where it cannot serve, saying so once."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from neco_jax.errors import ConfigError
from neco_jax.models import VisionTransformer, get_arch
from neco_jax.models import attention as attention_lib

# Measured: outputs <= 2.7e-7 (the ViT's CLS token; the kernel alone 2.6e-7), gradients <= 4.0e-7 (the ViT's
# parameters; the kernel's 2.4e-7); one block of all queries equals the plain path exactly. The bounds are 3x.
OUT_TOL, GRAD_TOL = 8e-7, 1.2e-6


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _qkv(shape=(2, 37, 3, 16), seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    return [jax.random.normal(k, shape, jnp.float32) for k in keys]


def _kernel(implementation: str, chunk: int, q, k, v, cotangent):
    """Output and (dq, dk, dv) of sum(attention * cotangent)."""

    def attend(q, k, v):
        scale = q.shape[-1] ** -0.5
        return attention_lib.dot_product_attention(q, k, v, scale=scale, implementation=implementation, chunk=chunk)

    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(cotangent)


# 37 queries: 8 blocks of 5 (3 padding rows), 2 of 19 (one padding row), one block
@pytest.mark.parametrize("chunk", [5, 19, 512])
def test_chunked_kernel_matches_the_plain_path(chunk):
    q, k, v, cotangent = _qkv()
    out0, grads0 = _kernel("xla", chunk, q, k, v, cotangent)
    out, grads = _kernel("chunked", chunk, q, k, v, cotangent)
    assert out.shape == out0.shape and rel(out, out0) <= OUT_TOL
    for g, g0 in zip(grads, grads0):
        assert rel(g, g0) <= GRAD_TOL


def _residual_shapes(implementation: str, chunk: int, q, k, v) -> list[tuple[int, ...]]:
    """Shapes of what the backward pass keeps (the leaves of jax.vjp's closure)."""
    _, vjp = jax.vjp(
        lambda q, k, v: attention_lib.dot_product_attention(
            q, k, v, scale=0.25, implementation=implementation, chunk=chunk
        ),
        q,
        k,
        v,
    )
    return [tuple(leaf.shape) for leaf in jax.tree.leaves(vjp)]


def test_backward_keeps_no_scores():
    q, k, v, _ = _qkv()
    n = q.shape[1]
    kept_by_xla = _residual_shapes("xla", 8, q, k, v)
    assert any(shape[-2:] == (n, n) for shape in kept_by_xla)  # the plain path keeps its probabilities
    scores = q.shape[0] * q.shape[2] * n * n  # B x heads x N x N
    assert max(np.prod(s) for s in kept_by_xla) >= scores
    for chunk in (8, 512):  # several blocks, and one
        kept = _residual_shapes("chunked", chunk, q, k, v)
        assert max(np.prod(s) for s in kept) < scores  # q, k, v (q padded to whole blocks) and no more


def _vit_vjp(attention: str, chunk: int, x, return_attention: bool):
    """Outputs, and the parameter gradients of <outputs, a random cotangent> (a VJP: a loss whose gradient sums
    cancel, e.g. sum(sin(tokens)), would measure fp32's own noise: there the plain path's cls_token gradient is
    itself 4e-5 off a float64 run)."""
    cfg = get_arch("vit_tiny_test", attention=attention, attention_chunk=chunk)
    graphdef, params = nnx.split(VisionTransformer(cfg, rngs=nnx.Rngs(0)))

    def forward(p):
        out = nnx.merge(graphdef, p)(x, return_attention=return_attention)
        return {k: out[k] for k in ("x_prenorm", "attn_cls") if k in out}, out

    def loss(p):
        outs, out = forward(p)
        keys = jax.random.split(jax.random.PRNGKey(5), len(outs))
        return sum(jnp.sum(o * jax.random.normal(k, o.shape)) for k, o in zip(keys, outs.values())), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return out, jax.tree.leaves(grads)


def test_vit_with_chunked_attention_matches_the_plain_path():
    """The tiny test ViT at 70 px (26 tokens) in blocks of 7 query rows: every output (the CLS attention row
    included) and every parameter gradient."""
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 70, 70, 3))
    out0, g0 = _vit_vjp("xla", 7, x, return_attention=True)
    out1, g1 = _vit_vjp("chunked", 7, x, return_attention=True)
    for name in out0.keys() - {"x_norm_regtokens"}:  # (2, 0, 64): no registers
        assert rel(out1[name], out0[name]) <= OUT_TOL, name
    assert len(g1) == len(g0)
    for a, b in zip(g1, g0):
        if np.any(b):  # mask_token: unused in the forward pass, zero gradient on both sides
            assert rel(a, b) <= GRAD_TOL
        else:
            assert not np.any(a)


def test_auto_chooses_by_platform_dtype_and_size():
    resolve = attention_lib.resolve
    assert attention_lib.current_platform() == "cpu"
    assert resolve("auto", jnp.float32, 257) == "xla"  # CPU, one block: the plain path, nothing recomputed
    assert resolve("auto", jnp.bfloat16, 1370) == "chunked"
    for platform in ("gpu", "cuda"):
        with attention_lib.compiling_for(platform):
            assert attention_lib.current_platform() == "gpu"
            assert resolve("auto", jnp.bfloat16, 50) == resolve("auto", jnp.float16, 1370) == "cudnn"
            assert resolve("auto", jnp.float32, 50) == "chunked"
    with attention_lib.compiling_for("tpu"):
        assert resolve("auto", jnp.bfloat16, 50) == resolve("auto", jnp.float32, 1370) == "chunked"
    assert attention_lib.current_platform() == "cpu"
    assert resolve("xla", jnp.bfloat16, 1370) == "xla"


def test_cudnn_falls_back_to_chunked_and_says_so_once(caplog):
    """float32 on a GPU target (cuDNN's flash attention takes 16-bit inputs) and any dtype off a GPU."""
    q, k, v, cotangent = _qkv(seed=3)
    expected, _ = _kernel("chunked", 16, q, k, v, cotangent)
    with caplog.at_level(logging.WARNING, logger=attention_lib.__name__):
        with attention_lib.compiling_for("gpu"):
            for _ in range(2):
                out, _ = _kernel("cudnn", 16, q, k, v, cotangent)
                np.testing.assert_array_equal(out, expected)
        out, _ = _kernel("cudnn", 16, *(a.astype(jnp.bfloat16) for a in (q, k, v, cotangent)))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages  # once per reason, however often traced
    assert "float32" in messages[0] and "using the chunked attention" in messages[0]
    assert "not a GPU" in messages[1]


@pytest.mark.parametrize(
    "fields, words",
    [({"attention": "flash"}, "attention must be one of"), ({"attention_chunk": 0}, "attention_chunk must be")],
)
def test_bad_attention_fields_are_named(fields, words):
    with pytest.raises(ConfigError, match=words):
        get_arch("vit_tiny_test", **fields)
