"""The Vision Transformer of DINOv2 (and of DINO in timm's layout) as a Flax NNX module.

Parameter tree (nnx.state paths, what the converters map to): `cls_token` (1,1,D), `pos_embed` (1,1+G*G,D),
`register_tokens` (1,R,D) if R > 0, `mask_token` (1,D) if present, `patch_embed/proj/{kernel,bias}`,
`blocks/{i}/{norm1,attn/qkv,attn/proj,ls1,norm2,mlp/fc1,mlp/fc2 | mlp/w12,mlp/w3,ls2}`, `norm/{scale,bias}`.

Forward numerics follow `dinov2/models/vision_transformer.py`: CLS prepended, position embedding added
(the G x G table resampled for other grids, see `pos_embed.py`), then register tokens inserted after CLS
(they get no position embedding), pre-norm blocks with layer scale, final LayerNorm.

The blocks run under `nnx.scan`, so one block is traced and compiled however deep the model is. Their
parameters stay per block (`blocks/{i}/...` above): checkpoints, converters, optimizer labels and
`trainable_blocks` see the same tree as a Python loop would, and each forward pass stacks the blocks' weights
(one copy of them) to scan over. Blocks whose calls differ in static form run in separate scans: DINOv2's
batch-subset drop path takes a static subset size per block, and the last `n_last_blocks` also return their
outputs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from neco_jax.models.drop_path import (
    BATCH_SUBSET_THRESHOLD,
    add_residual_on_subset,
    drop_path,
    drop_path_schedule,
)
from neco_jax.models.layers import (
    Attention,
    LayerScale,
    Mlp,
    PatchEmbed,
    SwiGLUFFN,
    layer_norm,
)
from neco_jax.models.pos_embed import interpolate_pos_embed
from neco_jax.models.vit_config import ViTConfig


class Block(nnx.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        dim, dtype = config.embed_dim, config.compute_dtype
        ffn = SwiGLUFFN if config.ffn_layer == "swiglu" else Mlp
        self.norm1 = layer_norm(dim, rngs=rngs)
        self.attn = Attention(
            dim,
            config.num_heads,
            dtype=dtype,
            rngs=rngs,
            implementation=config.attention,
            chunk=config.attention_chunk,
        )
        self.ls1 = LayerScale(dim, config.layerscale_init) if config.layerscale else None
        self.norm2 = layer_norm(dim, rngs=rngs)
        self.mlp = ffn(dim, config.mlp_hidden_dim, dtype=dtype, rngs=rngs)
        self.ls2 = LayerScale(dim, config.layerscale_init) if config.layerscale else None
        self.batch_subset = config.drop_path_mode == "dinov2"  # DINOv2's variant above rate 0.1

    def _attn_residual(self, x: jax.Array, return_attention: bool) -> tuple[jax.Array, jax.Array | None]:
        out, attn = self.attn(self.norm1(x), return_attention=return_attention)
        out = out.astype(jnp.float32)
        return (self.ls1(out) if self.ls1 is not None else out), attn

    def _mlp_residual(self, x: jax.Array) -> jax.Array:
        out = self.mlp(self.norm2(x)).astype(jnp.float32)
        return self.ls2(out) if self.ls2 is not None else out

    def drop_variant(self, drop_rate: float) -> str:
        """How this block drops paths at `drop_rate`: "none", "per_sample" or "batch_subset" (DINOv2 above 0.1)."""
        if drop_rate <= 0.0:
            return "none"
        return "batch_subset" if self.batch_subset and drop_rate > BATCH_SUBSET_THRESHOLD else "per_sample"

    def __call__(
        self,
        x: jax.Array,
        *,
        drop_rate: float | jax.Array = 0.0,
        key: jax.Array | None = None,
        return_attention: bool = False,
        variant: str | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """x (B, N, D) fp32 -> (x, CLS attention row (B, heads, N) or None). drop_rate > 0 needs `key`.

        `variant` is `drop_variant(drop_rate)` unless given; give it when drop_rate is a traced per-sample rate
        (a scanned per-block input), which `drop_variant` cannot look at.
        """
        variant = variant or self.drop_variant(drop_rate)
        if variant == "batch_subset":
            if return_attention:
                raise ValueError("return_attention is not available in a block trained with batch-subset drop path")
            key_attn, key_mlp = jax.random.split(key)
            x = add_residual_on_subset(x, lambda y: self._attn_residual(y, False)[0], drop_rate, key_attn)
            x = add_residual_on_subset(x, self._mlp_residual, drop_rate, key_mlp)
            return x, None
        residual, attn = self._attn_residual(x, return_attention)
        if variant == "per_sample":
            key_attn, key_mlp = jax.random.split(key)
            x = x + drop_path(residual, drop_rate, key_attn)
            x = x + drop_path(self._mlp_residual(x), drop_rate, key_mlp)
        else:
            x = x + residual
            x = x + self._mlp_residual(x)
        return x, attn


class VisionTransformer(nnx.Module):
    """DINOv2-style ViT. Call on NHWC ImageNet-normalised images; returns DINOv2's `forward_features` dict."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.config = config
        dim, grid = config.embed_dim, config.pos_grid
        normal = nnx.initializers.normal
        self.patch_embed = PatchEmbed(config.patch_size, dim, dtype=config.compute_dtype, rngs=rngs)
        self.cls_token = nnx.Param(normal(1e-6)(rngs.params(), (1, 1, dim), jnp.float32))
        # PyTorch's trunc_normal_(std=0.02) with its +-2 absolute bounds: in effect N(0, 0.02^2).
        self.pos_embed = nnx.Param(normal(0.02)(rngs.params(), (1, 1 + grid * grid, dim), jnp.float32))
        if config.num_register_tokens:
            shape = (1, config.num_register_tokens, dim)
            self.register_tokens = nnx.Param(normal(1e-6)(rngs.params(), shape, jnp.float32))
        if config.has_mask_token:
            self.mask_token = nnx.Param(jnp.zeros((1, dim), jnp.float32))
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.depth)])
        self.norm = layer_norm(dim, rngs=rngs)
        self.drop_rates = drop_path_schedule(config.drop_path_rate, config.depth)

    def _embed(self, x: jax.Array) -> jax.Array:
        """Images (B, H, W, 3) -> tokens [cls, registers, patches] (B, 1 + R + h*w, D) in fp32."""
        cfg = self.config
        b, height, width, _ = x.shape
        grid_hw = (height // cfg.patch_size, width // cfg.patch_size)
        patches = self.patch_embed(x.astype(cfg.compute_dtype)).astype(jnp.float32)
        patches = patches.reshape(b, grid_hw[0] * grid_hw[1], cfg.embed_dim)
        cls = jnp.broadcast_to(self.cls_token[...], (b, 1, cfg.embed_dim))
        pos = interpolate_pos_embed(
            self.pos_embed[...],
            grid_hw,
            (height, width),
            offset=cfg.interpolate_offset,
            antialias=cfg.interpolate_antialias,
        )
        tokens = jnp.concatenate([cls, patches], axis=1) + pos
        if cfg.num_register_tokens:
            regs = jnp.broadcast_to(self.register_tokens[...], (b, cfg.num_register_tokens, cfg.embed_dim))
            tokens = jnp.concatenate([tokens[:, :1], regs, tokens[:, 1:]], axis=1)
        return tokens

    def __call__(
        self,
        x: jax.Array,
        *,
        deterministic: bool = True,
        key: jax.Array | None = None,
        return_attention: bool = False,
        n_last_blocks: int = 0,
    ) -> dict[str, Any]:
        """Forward pass.

        x: (B, H, W, 3) float, ImageNet-normalised; H, W need not be multiples of the patch (the border is dropped).
        deterministic=False turns on stochastic depth (drawn from `key`); return_attention is then unavailable
        if the last block's rate is above 0.1 (DINOv2's batch-subset variant runs attention on a subset).
        Returns `x_norm_clstoken` (B, D), `x_norm_regtokens` (B, R, D), `x_norm_patchtokens` (B, N, D) in
        row-major patch order, `x_prenorm` (B, 1+R+N, D); with return_attention also `attn_cls` (B, heads, N),
        the last block's softmax attention from CLS to the patches; with n_last_blocks=n also `blocks`, the
        last n block outputs after the final norm.
        """
        cfg = self.config
        depth = len(self.blocks)
        if not 0 <= n_last_blocks <= depth:
            raise ValueError(f"n_last_blocks must be in [0, {depth}], got {n_last_blocks}")
        training = not deterministic and cfg.drop_path_rate > 0
        if training and key is None:
            raise ValueError("deterministic=False with drop_path_rate > 0 needs a PRNG `key`")
        tokens = self._embed(x)
        outputs, attn = [], None
        for start, stop, variant, collect in self._segments(training, n_last_blocks):
            if return_attention and stop == depth:  # carried through the scan: the last block's remains
                attn = jnp.zeros((tokens.shape[0], cfg.num_heads, tokens.shape[1]), jnp.float32)
            tokens, attn, stacked = self._scan_blocks(start, stop, variant, tokens, attn, key, collect=collect)
            if collect:
                outputs.extend(stacked)
        normed = self.norm(tokens)
        first_patch = 1 + cfg.num_register_tokens
        result = {
            "x_norm_clstoken": normed[:, 0],
            "x_norm_regtokens": normed[:, 1:first_patch],
            "x_norm_patchtokens": normed[:, first_patch:],
            "x_prenorm": tokens,
        }
        if return_attention:
            result["attn_cls"] = attn[:, :, first_patch:]
        if n_last_blocks:
            result["blocks"] = tuple(self.norm(out) for out in outputs)
        return result

    def _segments(self, training: bool, n_last_blocks: int) -> list[tuple[int, int, str, bool]]:
        """Runs of consecutive blocks called alike, as (start, stop, drop variant, outputs returned?): one scan
        each.

        In training a rate of 0 (block 0) runs as per-sample drop path, which then keeps every sample with
        scale 1, the numbers of no drop path; a batch-subset block runs alone (its rate is static). A run is
        also cut where the last `n_last_blocks` (whose outputs are returned) begin.
        """
        depth = len(self.blocks)
        kinds = []
        for i, block in enumerate(self.blocks):
            variant = block.drop_variant(self.drop_rates[i]) if training else "none"
            if training and variant == "none":
                variant = "per_sample"
            kinds.append((variant, i if variant == "batch_subset" else None, i >= depth - n_last_blocks))
        segments, start = [], 0
        for i in range(1, depth + 1):
            if i == depth or kinds[i] != kinds[start]:
                segments.append((start, i, kinds[start][0], kinds[start][2]))
                start = i
        return segments

    def _scan_blocks(
        self,
        start: int,
        stop: int,
        variant: str,
        tokens: jax.Array,
        attn: jax.Array | None,
        key: jax.Array | None,
        *,
        collect: bool,
    ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
        """Blocks start..stop-1 under one `nnx.scan` (each rematerialised if configured).

        Returns (tokens, the last block's CLS attention if `attn` was given, the blocks' outputs stacked
        (stop - start, B, N, D) if `collect`, else None). Per-block inputs: the block index (its PRNG stream is
        `fold_in(key, index)`) and its drop rate; a batch-subset block's rate is static.
        """
        graphdef, _ = nnx.split(self.blocks[start])
        states = [nnx.state(self.blocks[i]) for i in range(start, stop)]
        stacked = nnx.merge(graphdef, jax.tree.map(lambda *leaves: jnp.stack(leaves), *states))
        static_rate = self.drop_rates[start] if variant == "batch_subset" else None
        rates = jnp.asarray(self.drop_rates[start:stop], jnp.float32)

        def body(block: Block, carry, inputs):
            tokens, attn = carry
            index, rate = inputs
            block_key = None if variant == "none" else jax.random.fold_in(key, index)
            tokens, attn = block(
                tokens,
                drop_rate=rate if static_rate is None else static_rate,
                key=block_key,
                return_attention=attn is not None,
                variant=variant,
            )
            return (tokens, attn), (tokens if collect else None)

        if self.config.remat:  # the scan already keeps XLA from merging the recomputation into the forward
            policy = getattr(jax.checkpoint_policies, self.config.remat_policy) if self.config.remat_policy else None
            body = nnx.remat(body, prevent_cse=False, policy=policy)
        scan = nnx.scan(body, in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0))
        (tokens, attn), outputs = scan(stacked, (tokens, attn), (jnp.arange(start, stop), rates))
        return tokens, attn, outputs
