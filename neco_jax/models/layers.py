"""Transformer building blocks with DINOv2's parameter names and numerics.

Linear layers compute in the configured dtype (bf16 on accelerators) from fp32 parameters; the caller keeps
LayerNorm and the residual stream in fp32. GELU is the exact erf form, as PyTorch's `nn.GELU()`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from neco_jax.models import attention as attention_lib
from neco_jax.models.vit_config import ATTENTION_CHUNK

# PyTorch's trunc_normal_(std=0.02) truncates at +-2 in absolute value (+-100 sigma): in effect a plain normal.
LINEAR_INIT = nnx.initializers.normal(stddev=0.02)


def linear(in_dim: int, out_dim: int, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Linear:
    """A Linear with the timm/DINOv2 init (N(0, 0.02^2) weights, zero bias) and fp32 parameters."""
    return nnx.Linear(
        in_dim,
        out_dim,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=LINEAR_INIT,
        bias_init=nnx.initializers.zeros_init(),
        rngs=rngs,
    )


def layer_norm(dim: int, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm(eps=1e-6) in fp32 with PyTorch's two-pass variance."""
    return nnx.LayerNorm(dim, epsilon=1e-6, dtype=jnp.float32, use_fast_variance=False, rngs=rngs)


class PatchEmbed(nnx.Module):
    """Non-overlapping p x p patches -> D (a stride-p convolution; leftover border pixels are dropped)."""

    def __init__(self, patch_size: int, embed_dim: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        # PyTorch's default Conv2d init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
        bound = (3 * patch_size * patch_size) ** -0.5
        uniform = _symmetric_uniform(bound)
        self.proj = nnx.Conv(
            3,
            embed_dim,
            kernel_size=(patch_size, patch_size),
            strides=(patch_size, patch_size),
            padding="VALID",
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=uniform,
            bias_init=uniform,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, 3) -> (B, H//p, W//p, D)."""
        return self.proj(x)


def _symmetric_uniform(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Attention(nnx.Module):
    """Multi-head self-attention with a fused qkv projection whose output is ordered (3, heads, head_dim)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
        implementation: str = "auto",
        chunk: int = ATTENTION_CHUNK,
    ):
        self.num_heads = num_heads
        self.implementation, self.chunk = implementation, chunk
        self.qkv = linear(dim, 3 * dim, dtype=dtype, rngs=rngs)
        self.proj = linear(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, *, return_attention: bool = False) -> tuple[jax.Array, jax.Array | None]:
        """(B, N, D) -> ((B, N, D), the first token's softmax attention (B, heads, N) in fp32, or None).

        The output goes through `neco_jax.models.attention` by `implementation` (fp32 softmax; "auto" keeps no
        N x N scores for the backward pass on accelerators). The requested attention row of the first (CLS) token is an explicit fp32 softmax of q_cls k^T / sqrt(d),
        which avoids materialising the full (B, heads, N, N) map.
        """
        b, n, d = x.shape
        head_dim = d // self.num_heads
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scale = head_dim**-0.5
        attn_cls = None
        if return_attention:
            logits = jnp.einsum("bhc,bkhc->bhk", q[:, 0] * scale, k, preferred_element_type=jnp.float32)
            attn_cls = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        out = attention_lib.dot_product_attention(
            q, k, v, scale=scale, implementation=self.implementation, chunk=self.chunk
        )
        return self.proj(out.reshape(b, n, d)), attn_cls


class Mlp(nnx.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden_dim: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.fc1 = linear(dim, hidden_dim, dtype=dtype, rngs=rngs)
        self.fc2 = linear(hidden_dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class SwiGLUFFN(nnx.Module):
    """DINOv2's SwiGLU feed-forward (ViT-g): w12 -> (x1, x2) halves -> silu(x1) * x2 -> w3."""

    def __init__(self, dim: int, hidden_dim: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.w12 = linear(dim, 2 * hidden_dim, dtype=dtype, rngs=rngs)
        self.w3 = linear(hidden_dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x1, x2 = jnp.split(self.w12(x), 2, axis=-1)
        return self.w3(jax.nn.silu(x1) * x2)


class LayerScale(nnx.Module):
    """Per-channel residual scale `gamma` (DINOv2's `ls1`/`ls2`)."""

    def __init__(self, dim: int, init_value: float):
        self.gamma = nnx.Param(jnp.full((dim,), init_value, dtype=jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gamma[...]
