"""`ViTConfig`: everything that fixes a ViT's parameters and forward pass, and the values its fields allow.

A module of its own, without JAX or Flax, so that the training settings (`neco_jax/settings.py`) and the
recipe configs read its defaults and allowed values without loading them (`neco_jax/models/vit.py` builds
the model from it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from neco_jax.errors import ConfigError

# Compute dtypes of the matmuls (the one list: training, evaluation and the converters read it here).
DTYPES = ("float32", "bfloat16")
_FFN_LAYERS = ("mlp", "swiglu")
_FIELD_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str}
_DROP_PATH_MODES = ("dinov2", "per_sample")
# How softmax attention is computed (neco_jax/models/attention.py), and the chunked kernel's query rows per block:
# 3 blocks at 518 px (1370 tokens), 1 at 224 px (257).
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "chunked", "cudnn")
ATTENTION_CHUNK = 512
# jax.checkpoint_policies that are policies themselves (the others build one from names).
REMAT_POLICIES = ("", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable", "everything_saveable")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Everything that fixes a ViT's parameters and forward pass.

    arch: name of the architecture (see `neco_jax.models.archs`), informative only.
    patch_size, embed_dim, depth, num_heads, mlp_ratio: the usual ViT sizes.
    ffn_layer: "mlp" (fc1-GELU-fc2) or "swiglu" (DINOv2's fused SwiGLU of ViT-g, width rule in `layers.py`).
    num_register_tokens: 0, or 4 for DINOv2 with registers.
    layerscale / layerscale_init: per-channel residual scales `ls1`/`ls2` (DINOv2 yes, DINO no); init value
        for random init (hub weights were built with 1.0; DINOv2 training uses 1e-5).
    pos_grid: side G of the learned position table (37 for DINOv2 at 518 px; 14 or 28 for DINO).
    interpolate_offset / interpolate_antialias: position-table resampling rule. 0.1 / False is DINOv2's,
        DINO's and NeCo's (scale_factor with +0.1); 0.0 / True is the hub's register models (explicit size).
    has_mask_token: keep DINOv2's (unused in forward) `mask_token` parameter, so hub exports are complete.
    drop_path_rate: stochastic depth rate of the last block (linear schedule from 0).
    drop_path_mode: "dinov2" (DINOv2's blocks: per-sample up to rate 0.1, batch-subset above) or "per_sample"
        (DINO's blocks, NeCo's `src/models/vit.py`: per-sample at every rate).
    dtype: compute dtype of matmuls, "float32" or "bfloat16"; parameters, LayerNorm, softmax and the
        residual stream stay float32.
    remat: recompute each block's activations in the backward pass instead of storing them (same
        numbers, less memory, about one extra forward of compute), to fit larger training batches.
    remat_policy: with remat, what the backward pass may keep instead of recomputing: "" keeps nothing, or the
        name of a `jax.checkpoint_policies` policy (`REMAT_POLICIES`), e.g. "dots_with_no_batch_dims_saveable" keeps the matmul
        outputs and recomputes only the elementwise work (more memory than "", less compute).
    attention: how softmax attention is computed (`neco_jax.models.attention`): "auto" (cuDNN flash attention for
        bfloat16 on GPUs, else the exact chunked attention, or XLA's on the CPU at small sizes), "xla" (keeps
        the N x N scores for the backward pass), "chunked" or "cudnn". The same numbers to rounding.
    attention_chunk: query rows per block of the chunked attention (its scores in flight: B x heads x this x N).
    """

    arch: str = "custom"
    patch_size: int = 14
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    ffn_layer: str = "mlp"
    num_register_tokens: int = 0
    layerscale: bool = True
    layerscale_init: float = 1.0
    pos_grid: int = 37
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False
    has_mask_token: bool = True
    drop_path_rate: float = 0.0
    drop_path_mode: str = "dinov2"
    dtype: str = "float32"
    remat: bool = False
    remat_policy: str = ""
    attention: str = "auto"
    attention_chunk: int = ATTENTION_CHUNK

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            allowed = _FIELD_TYPES[field.type]
            if not isinstance(value, allowed) or (field.type != "bool" and isinstance(value, bool)):
                raise ConfigError(f"ViTConfig.{field.name} must be {field.type}, got {value!r}")
        for name in ("patch_size", "embed_dim", "depth", "num_heads", "pos_grid", "attention_chunk"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"ViTConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"ViTConfig.embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.ffn_layer not in _FFN_LAYERS:
            raise ConfigError(f"ViTConfig.ffn_layer must be one of {_FFN_LAYERS}, got {self.ffn_layer!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"ViTConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.num_register_tokens < 0:
            raise ConfigError(f"ViTConfig.num_register_tokens must be >= 0, got {self.num_register_tokens}")
        if self.drop_path_mode not in _DROP_PATH_MODES:
            raise ConfigError(
                f"ViTConfig.drop_path_mode must be one of {_DROP_PATH_MODES}, got {self.drop_path_mode!r}"
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"ViTConfig.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"ViTConfig.remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
        if self.remat_policy and not self.remat:
            raise ConfigError(f"ViTConfig.remat_policy {self.remat_policy!r} needs remat=True")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(f"ViTConfig.attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {self.attention!r}")
        if self.interpolate_offset < 0:
            raise ConfigError(f"ViTConfig.interpolate_offset must be >= 0, got {self.interpolate_offset}")

    @property
    def compute_dtype(self):
        """The jnp dtype of `dtype` (JAX is imported here, not with the module: configs build without it)."""
        import jax.numpy as jnp  # JAX: only when a model is built (configs build without it)

        return jnp.dtype(self.dtype)

    @property
    def mlp_hidden_dim(self) -> int:
        hidden = int(self.embed_dim * self.mlp_ratio)
        return swiglu_hidden_dim(self.embed_dim, self.mlp_ratio) if self.ffn_layer == "swiglu" else hidden

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ViTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown ViTConfig field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**values)


def swiglu_hidden_dim(dim: int, mlp_ratio: float) -> int:
    """DINOv2's `SwiGLUFFNFused` width: 2/3 of int(dim * mlp_ratio), rounded up to a multiple of 8 (g/14: 4096)."""
    return (int(int(dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8
