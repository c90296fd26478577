"""NeCo's projection head: Linear-GELU-Linear-GELU-Linear, then L2 normalisation, all in fp32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from neco_jax.l2_norm import l2_normalize
from neco_jax.models.layers import LINEAR_INIT
from neco_jax.settings import HeadSettings


class ProjectionHead(nnx.Module):
    """D -> hidden -> ... -> out_dim with exact GELU between layers; output rows are unit vectors.

    Weights are N(0, 0.02^2) (the original's trunc_normal_ with +-2 absolute bounds), biases zero.
    Parameters: `layers/{i}/{kernel,bias}`.
    """

    def __init__(
        self,
        in_dim: int,
        *,
        hidden_dim: int = HeadSettings.hidden_dim,
        out_dim: int = HeadSettings.out_dim,
        num_layers: int = HeadSettings.num_layers,
        rngs: nnx.Rngs,
    ):
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nnx.List(
            [
                nnx.Linear(
                    d_in,
                    d_out,
                    dtype=jnp.float32,
                    param_dtype=jnp.float32,
                    kernel_init=LINEAR_INIT,
                    bias_init=nnx.initializers.zeros_init(),
                    rngs=rngs,
                )
                for d_in, d_out in zip(dims[:-1], dims[1:])
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = jax.nn.gelu(x, approximate=False)
        return l2_normalize(x)
