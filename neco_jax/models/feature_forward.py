"""The frozen backbone's forward pass that every dense evaluation reads, as one function of (state, images).

It lives below the evaluation package so that `neco_jax.plan` can compile an evaluation job's forward for a device
this machine lacks without importing the evaluation code (the layers of README "Layout").
"""

import jax.numpy as jnp
from flax import nnx


def feature_forward(graphdef: nnx.GraphDef, patch_size: int):
    """`forward(state, images, with_attention=False)`: final-norm patch tokens (B, h, w, D) float32 (and the CLS
    attention (B, heads, h, w)) of the backbone `graphdef` with parameters `state`; what the evaluation's
    `FeatureExtractor` jits, and what `neco_jax.plan` compiles for other devices."""
    p = patch_size

    def forward(state, x, with_attention: bool = False):
        out = nnx.merge(graphdef, state)(x, deterministic=True, return_attention=with_attention)
        b, h, w = x.shape[0], x.shape[1] // p, x.shape[2] // p
        feats = out["x_norm_patchtokens"].astype(jnp.float32).reshape(b, h, w, -1)
        if not with_attention:
            return feats
        attn = out["attn_cls"].astype(jnp.float32)
        return feats, attn.reshape(b, attn.shape[1], h, w)

    return forward
