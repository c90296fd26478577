"""Named architectures: the DINOv2 and DINO backbones NeCo post-trains, plus a tiny one for tests."""

from __future__ import annotations

from neco_jax.errors import ConfigError
from neco_jax.models.vit_config import ViTConfig

_DINOV2_SIZES = {
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "giant": dict(embed_dim=1536, depth=40, num_heads=24, ffn_layer="swiglu"),
}
_DINO_SIZES = {
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
}
# Width -> heads in the DINO and DINOv2 families (64-wide heads at every size): the only widths whose head
# count a state dict without a recorded architecture may be read with.
FAMILY_HEADS: dict[int, int] = {
    d["embed_dim"]: d["num_heads"] for d in (*_DINOV2_SIZES.values(), *_DINO_SIZES.values())
}


def _build() -> dict[str, ViTConfig]:
    archs = {}
    for size, dims in _DINOV2_SIZES.items():
        for suffix, registers in (("", 0), ("_reg4", 4)):
            name = f"vit_{size}_patch14{suffix}_dinov2"
            # Registers keep NeCo's interpolation rule (offset 0.1, no antialias); the hub's register models
            # use interpolate_offset=0.0, interpolate_antialias=True (pass them as overrides).
            archs[name] = ViTConfig(arch=name, patch_size=14, pos_grid=37, num_register_tokens=registers, **dims)
    for size, dims in _DINO_SIZES.items():
        for patch in (16, 8):
            name = f"vit_{size}_patch{patch}_dino"
            archs[name] = ViTConfig(
                arch=name,
                patch_size=patch,
                pos_grid=224 // patch,
                layerscale=False,
                has_mask_token=False,
                drop_path_mode="per_sample",  # DINO's DropPath; the batch-subset variant is DINOv2's only
                **dims,
            )
    archs["vit_tiny_test"] = ViTConfig(
        arch="vit_tiny_test", patch_size=14, embed_dim=64, depth=2, num_heads=2, pos_grid=4
    )
    return archs


ARCHS: dict[str, ViTConfig] = _build()


def get_arch(name: str, **overrides) -> ViTConfig:
    """The named architecture's config, with any field replaced by `overrides` (e.g. drop_path_rate=0.1)."""
    if name not in ARCHS:
        raise ConfigError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHS))}")
    return ViTConfig.from_dict({**ARCHS[name].to_dict(), **overrides})
