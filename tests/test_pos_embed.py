"""Position-table resampling against torch `F.interpolate` and the official DINOv2 `interpolate_pos_encoding`."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference_models import dinov2_reference, relative_error

from neco_jax.models.pos_embed import interpolate_pos_embed, resample_grid

# Relative error vs torch: measured <= 1.2e-6 (offset 0 without antialias; the other rules 7.0e-7, the official
# interpolate_pos_encoding 6.6e-7); the bound is 3x.
TOL = 3.5e-6
CASES = [  # (table side G, output h, output w)
    (37, 7, 7),
    (37, 16, 16),
    (37, 32, 32),
    (37, 16, 22),
    (37, 22, 16),
    (37, 37, 38),
    (37, 74, 74),
    (37, 80, 5),
    (14, 6, 6),
    (14, 28, 28),
    (14, 14, 20),
    (28, 56, 56),
    (28, 12, 12),
    (4, 2, 3),
]


def _table(g, dim=6, seed=0):
    return np.random.default_rng(seed).standard_normal((g, g, dim)).astype(np.float32) * 3


def _torch(table, **kwargs):
    grid = torch.from_numpy(table).permute(2, 0, 1)[None]
    return F.interpolate(grid, mode="bicubic", align_corners=False, **kwargs)[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("g, h, w", CASES)
def test_offset_rule_matches_torch_scale_factor(g, h, w):
    """DINOv2/DINO/NeCo: scale_factor = ((h + 0.1) / G, (w + 0.1) / G), bicubic, no antialias."""
    table = _table(g)
    expected = _torch(table, scale_factor=((h + 0.1) / g, (w + 0.1) / g))
    ours = resample_grid(jnp.asarray(table), (h, w), offset=0.1, antialias=False)
    assert ours.shape == expected.shape
    assert relative_error(ours, expected) <= TOL


@pytest.mark.parametrize("g, h, w", CASES)
def test_hub_register_rule_matches_torch_antialias(g, h, w):
    """The hub's register models: size=(h, w), bicubic, antialias=True (downsampling widens the kernel)."""
    table = _table(g, seed=1)
    expected = _torch(table, size=(h, w), antialias=True)
    ours = resample_grid(jnp.asarray(table), (h, w), offset=0.0, antialias=True)
    assert relative_error(ours, expected) <= TOL


@pytest.mark.parametrize("offset, antialias", [(0.0, False), (0.1, True)])
def test_other_combinations_match_torch(offset, antialias):
    for g, h, w in CASES:
        table = _table(g, seed=2)
        kwargs = {"scale_factor": ((h + 0.1) / g, (w + 0.1) / g)} if offset else {"size": (h, w)}
        expected = _torch(table, antialias=antialias, **kwargs)
        ours = resample_grid(jnp.asarray(table), (h, w), offset=offset, antialias=antialias)
        assert relative_error(ours, expected) <= TOL, (g, h, w)


def test_not_the_jax_image_kernel():
    """Guard against a silent switch to jax.image (Keys a=-0.5): the difference must be large."""
    import jax

    table = _table(37, seed=3)
    ours = resample_grid(jnp.asarray(table), (16, 16), offset=0.1, antialias=False)
    other = jax.image.resize(jnp.asarray(table), (16, 16, 6), "bicubic", antialias=False)
    assert relative_error(other, ours) > 1e-2


@pytest.fixture(scope="module")
def official():
    return dinov2_reference("small", seed=4)


@pytest.mark.parametrize(
    "image_hw",
    [(518, 518), (520, 520), (518, 527), (224, 224), (98, 98), (448, 448), (224, 308), (308, 224), (100, 230)],
)
def test_matches_official_interpolate_pos_encoding(official, image_hw):
    """Including DINOv2's exact skip condition: G x G grid *and* a square image (518x527 is resampled)."""
    height, width = image_hw
    grid_hw = (height // 14, width // 14)
    tokens = torch.zeros(1, 1 + grid_hw[0] * grid_hw[1], 384)
    with torch.no_grad():
        expected = official.interpolate_pos_encoding(tokens, height, width).numpy()  # DINOv2 calls (x, H, W)
    table = jnp.asarray(official.pos_embed.detach().numpy())
    ours = interpolate_pos_embed(table, grid_hw, image_hw, offset=0.1, antialias=False)
    assert ours.shape == expected.shape
    assert relative_error(ours, expected) <= TOL
    if grid_hw == (37, 37) and height == width:
        np.testing.assert_array_equal(ours, expected)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="square grid"):
        interpolate_pos_embed(jnp.zeros((1, 1 + 12, 4)), (3, 3), (42, 42), offset=0.1, antialias=False)
