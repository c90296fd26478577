"""ViTConfig and the architecture registry: named sizes, round trip, and clear errors for bad values."""

from __future__ import annotations

import pytest

from neco_jax.errors import UserError
from neco_jax.models import ARCHS, ViTConfig, get_arch


def test_registry_names_and_sizes():
    expected = {f"vit_{s}_patch14{r}_dinov2" for s in ("small", "base", "large", "giant") for r in ("", "_reg4")}
    expected |= {f"vit_{s}_patch{p}_dino" for s in ("small", "base") for p in (16, 8)} | {"vit_tiny_test"}
    assert set(ARCHS) == expected
    giant = get_arch("vit_giant_patch14_reg4_dinov2")
    assert (giant.embed_dim, giant.depth, giant.num_heads, giant.ffn_layer, giant.num_register_tokens) == (
        1536,
        40,
        24,
        "swiglu",
        4,
    )
    assert giant.mlp_hidden_dim == 4096
    dino8 = get_arch("vit_base_patch8_dino")
    assert (dino8.pos_grid, dino8.layerscale, dino8.has_mask_token) == (28, False, False)
    assert get_arch("vit_small_patch16_dino").pos_grid == 14
    assert get_arch("vit_small_patch14_dinov2").pos_grid == 37
    tiny = get_arch("vit_tiny_test")
    assert (tiny.patch_size, tiny.embed_dim, tiny.depth, tiny.num_heads, tiny.pos_grid) == (14, 64, 2, 2, 4)


def test_overrides_and_dict_round_trip():
    cfg = get_arch(
        "vit_small_patch14_reg4_dinov2",
        interpolate_offset=0.0,
        interpolate_antialias=True,
        drop_path_rate=0.1,
        dtype="bfloat16",
    )
    assert ViTConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.arch == "vit_small_patch14_reg4_dinov2" and cfg.interpolate_antialias


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: get_arch("vit_huge"), "unknown architecture 'vit_huge'"),
        (lambda: get_arch("vit_tiny_test", depht=3), "unknown ViTConfig field"),
        (lambda: get_arch("vit_tiny_test", dtype="float16"), "dtype must be one of"),
        (lambda: get_arch("vit_tiny_test", ffn_layer="geglu"), "ffn_layer must be one of"),
        (lambda: get_arch("vit_tiny_test", num_heads=3), "not divisible by num_heads"),
        (lambda: get_arch("vit_tiny_test", drop_path_rate=1.0), "drop_path_rate must be in"),
        (lambda: get_arch("vit_tiny_test", depth="12"), "depth must be int"),
        (lambda: get_arch("vit_tiny_test", layerscale=1), "layerscale must be bool"),
        (lambda: get_arch("vit_tiny_test", num_register_tokens=-1), "num_register_tokens must be >= 0"),
    ],
)
def test_bad_values_raise_user_errors(make, message):
    with pytest.raises(UserError, match=message):
        make()
