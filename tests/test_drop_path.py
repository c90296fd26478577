"""Stochastic depth: torch's float32 schedule, per-sample and batch-subset variants, deterministic mode."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from neco_jax.models import VisionTransformer, get_arch
from neco_jax.models.drop_path import add_residual_on_subset, drop_path, drop_path_schedule
from neco_jax.models.vit import Block


@pytest.mark.parametrize("rate", [0.0, 0.05, 0.1, 0.2, 0.3, 0.4])
def test_schedule_is_torch_linspace_float32(rate):
    for depth in range(1, 49):
        assert drop_path_schedule(rate, depth) == tuple(x.item() for x in torch.linspace(0, rate, depth)), depth


def test_neco_schedule_puts_only_the_last_block_above_0_1():
    rates = drop_path_schedule(0.1, 12)
    assert [r > 0.1 for r in rates] == [False] * 11 + [True]


def test_per_sample_drop_path_mask_and_scale():
    residual = jnp.ones((4000, 3, 2))
    out = np.asarray(drop_path(residual, 0.25, jax.random.key(0)))
    per_sample = out.reshape(4000, -1)
    assert np.all(per_sample == per_sample[:, :1])  # one decision per sample
    values = set(np.unique(per_sample).tolist())
    assert values == {0.0, np.float32(1 / 0.75).item()}
    assert np.mean(per_sample[:, 0] > 0) == pytest.approx(0.75, abs=0.03)


def test_batch_subset_adds_scaled_residual_to_exactly_the_subset():
    b, rate = 128, float(np.float32(0.1))  # NeCo's last block on 128 global crops: 115 samples, scale 128/115
    x = jnp.asarray(np.random.default_rng(0).standard_normal((b, 3, 2)), jnp.float32)
    seen = []

    def residual_fn(subset):
        seen.append(subset.shape[0])
        return 2.0 * subset + 1.0

    out = np.asarray(add_residual_on_subset(x, residual_fn, rate, jax.random.key(1)))
    assert seen == [115]
    x = np.asarray(x)
    with_res = np.isclose(out, x + (128 / 115) * (2 * x + 1), rtol=1e-6).all(axis=(1, 2))
    unchanged = (out == x).all(axis=(1, 2))
    assert with_res.sum() == 115 and unchanged.sum() == 13 and np.all(with_res ^ unchanged)


@pytest.fixture(scope="module")
def tiny_block():
    return Block(get_arch("vit_tiny_test"), rngs=nnx.Rngs(0))


def _branch_combinations(block, x, scale):
    """Outputs of a block for every (attention kept?, mlp kept?) combination, each kept branch scaled."""
    combos = []
    for keep_attn in (0.0, scale):
        y = x + keep_attn * block._attn_residual(x, False)[0]
        for keep_mlp in (0.0, scale):
            combos.append(y + keep_mlp * block._mlp_residual(y))
    return np.stack([np.asarray(c) for c in combos])


@pytest.mark.parametrize("rate", [0.05, 0.3])
def test_block_applies_independent_branch_drops(tiny_block, rate):
    """Per sample, the training output is one of the 4 (attn, mlp) keep/drop combinations, with the right scale:
    1/(1-rate) per sample for rate <= 0.1; b/subset for the batch-subset variant (rate > 0.1)."""
    b = 10
    x = jnp.asarray(np.random.default_rng(1).standard_normal((b, 5, 64)), jnp.float32)
    out, _ = tiny_block(x, drop_rate=rate, key=jax.random.key(2))
    scale = 1 / (1 - rate) if rate <= 0.1 else b / max(int(b * (1 - rate)), 1)
    combos = _branch_combinations(tiny_block, x, scale)  # (4, b, n, d)
    matches = np.isclose(combos, np.asarray(out)[None], rtol=1e-5, atol=1e-5).all(axis=(2, 3))  # (4, b)
    assert np.all(matches.sum(axis=0) >= 1)


def test_deterministic_mode_equals_no_drop_path():
    cfg = get_arch("vit_tiny_test", drop_path_rate=0.3)
    dropped = VisionTransformer(cfg, rngs=nnx.Rngs(0))
    plain = VisionTransformer(get_arch("vit_tiny_test"), rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 56, 56, 3)), jnp.float32)
    forward = nnx.jit(lambda m, y, k, det: m(y, deterministic=det, key=k)["x_prenorm"], static_argnums=3)
    key = jax.random.key(5)
    reference = forward(plain, x, key, True)
    np.testing.assert_array_equal(forward(dropped, x, key, True), reference)
    assert not np.allclose(forward(dropped, x, key, False), reference)
    with pytest.raises(ValueError, match="key"):
        dropped(x, deterministic=False)


def test_dino_blocks_use_per_sample_drop_path_at_every_rate():
    """DINO-architecture blocks (NeCo's src/models/vit.py DropPath) never take DINOv2's batch-subset path: at rate
    0.3 every sample is one of the keep/drop combinations scaled by 1/(1-rate), and all samples pass the block."""
    cfg = get_arch("vit_small_patch16_dino", depth=1, embed_dim=64, num_heads=2)
    assert cfg.drop_path_mode == "per_sample" and get_arch("vit_small_patch14_dinov2").drop_path_mode == "dinov2"
    block = Block(cfg, rngs=nnx.Rngs(0))
    b, rate = 12, 0.3
    x = jnp.asarray(np.random.default_rng(7).standard_normal((b, 5, 64)), jnp.float32)
    out, _ = block(x, drop_rate=rate, key=jax.random.key(3))
    combos = _branch_combinations(block, x, 1 / (1 - rate))
    matches = np.isclose(combos, np.asarray(out)[None], rtol=1e-5, atol=1e-5).all(axis=(2, 3))
    assert np.all(matches.sum(axis=0) >= 1)
    # The same block as DINOv2 would scale by b / subset instead, which no per-sample combination reproduces.
    subset_out, _ = Block(get_arch("vit_tiny_test"), rngs=nnx.Rngs(0))(x, drop_rate=rate, key=jax.random.key(3))
    tiny = Block(get_arch("vit_tiny_test"), rngs=nnx.Rngs(0))
    per_sample_combos = _branch_combinations(tiny, x, 1 / (1 - rate))
    subset_matches = np.isclose(per_sample_combos, np.asarray(subset_out)[None], rtol=1e-5, atol=1e-5).all(axis=(2, 3))
    assert not np.all(subset_matches.sum(axis=0) >= 1)
    with pytest.raises(Exception, match="drop_path_mode"):
        get_arch("vit_tiny_test", drop_path_mode="subset")


def test_dino_recipes_build_per_sample_students():
    from configs import dino_s16, dinov2_s14, leopart_s16, timet_s16
    from neco_jax import train_state
    from neco_jax.settings import from_config

    for module in (dino_s16, timet_s16, leopart_s16):
        student, teacher = train_state.vit_configs(from_config(module.get_config()).model)
        assert student.drop_path_mode == "per_sample" and student.drop_path_rate == 0.1
    assert train_state.vit_configs(from_config(dinov2_s14.get_config()).model)[0].drop_path_mode == "dinov2"
