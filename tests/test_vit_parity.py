"""Forward parity of the NNX ViT against the official DINOv2 code and timm, random weights, fp32 on CPU.

Error measure: relative_error(a, b) = max|a - b| / max|b| over the compared tensor. Each bound is 3x the worst
figure measured on the CPU (fp32), the figure README's "What is checked" states.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from reference_models import (
    dinov2_reference,
    load_torch_weights,
    param_shapes,
    randomize,
    relative_error,
    timm_reference,
    torch_params,
)

from neco_jax.models import VisionTransformer, get_arch

# One pytest-xdist worker runs the module: its reference models (module fixtures, up to 10 s each to build) are
# then built once, not once per worker.
pytestmark = pytest.mark.xdist_group("vit_parity")
# Tokens (CLS, patches, registers, pre-norm, intermediate blocks) vs dinov2 and timm: measured <= 2.4e-6 (DINOv2
# S/14 at 98; B/14 1.7e-6, timm reg4 1.4e-6, DINO S/16 1.6e-6, B/8 1.0e-6, SwiGLU 2.3e-6).
TOL = 7e-6
# The last block's CLS attention probabilities: measured 3.9e-6.
ATTENTION_TOL = 1.2e-5
# Parameter gradients, worst parameter: measured 7.9e-6 for ViT-S/14 at full width and depth (4.8e-6 to 9.8e-6 over
# other inputs), 2.4e-6 to 3.1e-6 for 2 blocks of 48.
GRADIENT_TOL_FULL = 2.4e-5
GRADIENT_TOL = 1e-5
SIZES = [(98, 98), (224, 224), (448, 448), (518, 518), (224, 308)]


def _jax_forward(model, x, **kwargs):
    return nnx.jit(lambda m, y: m(y, **kwargs))(model, x)


def _image(hw, seed=1, batch=1):
    return np.random.default_rng(seed).standard_normal((batch, *hw, 3)).astype(np.float32)


def _nchw(x):
    return torch.from_numpy(x).permute(0, 3, 1, 2)


def _pair(arch, ref, layout, **overrides):
    if layout == "timm":  # timm keeps no mask_token
        overrides.setdefault("has_mask_token", False)
    model = VisionTransformer(get_arch(arch, **overrides), rngs=nnx.Rngs(0))
    return load_torch_weights(model, ref.state_dict(), layout=layout)


@pytest.fixture(scope="module")
def dinov2_small():
    ref = dinov2_reference("small", seed=0)
    return ref, _pair("vit_small_patch14_dinov2", ref, "dinov2")


@pytest.fixture(scope="module")
def dinov2_base():
    ref = dinov2_reference("base", seed=1)
    return ref, _pair("vit_base_patch14_dinov2", ref, "dinov2")


def _check_dinov2(ref, model, hw):
    x = _image(hw)
    with torch.no_grad():
        expected = ref.forward_features(_nchw(x))
    out = _jax_forward(model, x)
    errors = {
        name: relative_error(out[name], expected[name])
        for name in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm")
    }
    print(f"{hw}: {errors}")
    assert out["x_norm_patchtokens"].shape == expected["x_norm_patchtokens"].shape
    assert out["x_norm_regtokens"].shape == (1, 0, model.config.embed_dim)
    assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("hw", SIZES, ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_dinov2_small_matches_official(dinov2_small, hw):
    _check_dinov2(*dinov2_small, hw)


@pytest.mark.slow
@pytest.mark.parametrize("hw", SIZES, ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_dinov2_base_matches_official(dinov2_base, hw):
    _check_dinov2(*dinov2_base, hw)


def test_attention_and_last_blocks_match_official(dinov2_small):
    """attn_cls = the last block's softmax(q k^T / sqrt(d)) from CLS to patches, computed explicitly in torch;
    `blocks` = DINOv2's get_intermediate_layers(n=2, norm=True)."""
    ref, model = dinov2_small
    x = _image((224, 168), seed=2, batch=2)
    captured = {}
    hook = ref.blocks[-1].attn.register_forward_hook(lambda mod, args, out: captured.update(x=args[0]))
    with torch.no_grad():
        ref.forward_features(_nchw(x))
        hook.remove()
        attn = ref.blocks[-1].attn
        tokens = captured["x"]
        b, n, d = tokens.shape
        qkv = attn.qkv(tokens).reshape(b, n, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4)
        probs = torch.softmax((qkv[0] * attn.scale) @ qkv[1].transpose(-2, -1), dim=-1)
        expected_attn = probs[:, :, 0, 1:]
        layers = ref.get_intermediate_layers(_nchw(x), n=2, return_class_token=True)
    out = _jax_forward(model, x, return_attention=True, n_last_blocks=2)
    assert out["attn_cls"].shape == (2, 6, (224 // 14) * (168 // 14))
    err = relative_error(out["attn_cls"], expected_attn)
    print(f"attn_cls: {err}")
    assert err <= ATTENTION_TOL
    assert len(out["blocks"]) == 2
    for ours, (patches, cls) in zip(out["blocks"], layers):
        errors = (relative_error(ours[:, 1:], patches), relative_error(ours[:, 0], cls))
        print(f"block patches, cls: {errors}")
        assert max(errors) <= TOL
    # the last of the blocks is the final normed output itself
    np.testing.assert_array_equal(out["blocks"][-1][:, 1:], out["x_norm_patchtokens"])


@pytest.fixture(scope="module")
def timm_reg4():
    ref = timm_reference("vit_small_patch14_reg4_dinov2", seed=3)
    return ref, _pair("vit_small_patch14_reg4_dinov2", ref, "timm")


def _check_timm(ref, model, hw, registers):
    x = _image(hw, seed=4)
    with torch.no_grad():
        expected = ref.forward_features(_nchw(x)).numpy()
    out = _jax_forward(model, x)
    first = 1 + registers
    errors = {
        "cls": relative_error(out["x_norm_clstoken"], expected[:, 0]),
        "patches": relative_error(out["x_norm_patchtokens"], expected[:, first:]),
    }
    if registers:
        errors["registers"] = relative_error(out["x_norm_regtokens"], expected[:, 1:first])
    print(f"{hw}: {errors}")
    assert max(errors.values()) <= TOL, errors


@pytest.mark.slow
def test_registers_match_timm_at_518(timm_reg4):
    _check_timm(*timm_reg4, (518, 518), registers=4)


def _timm_at_size(ref, name, hw, table, seed):
    """The same timm weights in a model built for `hw`, with its position table replaced by `table`."""
    resized = timm_reference(name, seed=seed, img_size=hw)
    state = dict(ref.state_dict())
    state["pos_embed"] = table
    resized.load_state_dict(state, strict=True)
    return resized.eval()


def _torch_resample(table, grid_hw, **kwargs):
    """(1, G*G, D) -> (1, h*w, D) with torch's F.interpolate (the independent reference of the rule)."""
    g = int(round(table.shape[1] ** 0.5))
    grid = table.reshape(1, g, g, -1).permute(0, 3, 1, 2)
    if kwargs.pop("offset", None):
        kwargs["scale_factor"] = ((grid_hw[0] + 0.1) / g, (grid_hw[1] + 0.1) / g)
    else:
        kwargs["size"] = grid_hw
    out = F.interpolate(grid, mode="bicubic", align_corners=False, **kwargs)
    return out.permute(0, 2, 3, 1).reshape(1, grid_hw[0] * grid_hw[1], -1)


@pytest.mark.slow
@pytest.mark.parametrize(
    "hw, hub_rule",
    [((224, 224), False), ((224, 308), True)],
    ids=["224-neco-rule", "224x308-hub-antialias-rule"],
)
def test_registers_at_other_sizes_match_torch_interpolation(timm_reg4, hw, hub_rule):
    """NeCo's rule (scale_factor with +0.1, no antialias) and the hub register rule (size, antialias), end to end."""
    ref, _ = timm_reg4
    grid_hw = (hw[0] // 14, hw[1] // 14)
    with torch.no_grad():
        table = ref.pos_embed.detach()
        table = (
            _torch_resample(table, grid_hw, antialias=True) if hub_rule else _torch_resample(table, grid_hw, offset=0.1)
        )
    resized = _timm_at_size(ref, "vit_small_patch14_reg4_dinov2", hw, table, seed=3)
    overrides = dict(interpolate_offset=0.0, interpolate_antialias=True) if hub_rule else {}
    model = _pair("vit_small_patch14_reg4_dinov2", ref, "timm", **overrides)
    _check_timm(resized, model, hw, registers=4)


@pytest.fixture(scope="module")
def dino_small16():
    ref = timm_reference("vit_small_patch16_224", seed=5)
    return ref, _pair("vit_small_patch16_dino", ref, "timm")


def test_dino_small16_matches_timm_at_224(dino_small16):
    _check_timm(*dino_small16, (224, 224), registers=0)


@pytest.mark.slow
def test_dino_small16_interpolation_rule_at_448(dino_small16):
    """timm resamples differently, so the reference is timm at 448 with the +0.1 scale_factor table from torch."""
    ref, model = dino_small16
    with torch.no_grad():
        table = ref.pos_embed.detach()
        patches = _torch_resample(table[:, 1:], (28, 28), offset=0.1)
        table = torch.cat([table[:, :1], patches], dim=1)
    resized = _timm_at_size(ref, "vit_small_patch16_224", (448, 448), table, seed=5)
    _check_timm(resized, model, (448, 448), registers=0)


@pytest.mark.slow
def test_dino_base8_matches_timm_at_224():
    ref = timm_reference("vit_base_patch8_224", seed=6)
    _check_timm(ref, _pair("vit_base_patch8_dino", ref, "timm"), (224, 224), registers=0)


@pytest.mark.slow
def test_swiglu_matches_official():
    """ViT-g's feed-forward (SwiGLUFFNFused, DINOv2's hidden-width rule) on a tiny DINOv2 model."""
    from dinov2.models.vision_transformer import DinoVisionTransformer

    ref = DinoVisionTransformer(
        img_size=56,
        patch_size=14,
        embed_dim=48,
        depth=2,
        num_heads=2,
        init_values=1.0,
        block_chunks=0,
        ffn_layer="swiglufused",
    )
    ref = randomize(ref, seed=7).eval()
    model = _pair("vit_tiny_test", ref, "dinov2", embed_dim=48, ffn_layer="swiglu")
    for hw in [(56, 56), (70, 42)]:
        _check_dinov2(ref, model, hw)


def _meta_state(build):
    with torch.device("meta"):
        return build().state_dict()


@pytest.mark.parametrize("size", ["small", "base", "large", pytest.param("giant", marks=pytest.mark.slow)])
def test_parameter_shapes_match_references(size):
    """Every DINOv2 hub size (official code) and its timm register variant map one-to-one onto our tree."""
    from dinov2.models import vision_transformer as dinov2_vit

    build = {
        "small": dinov2_vit.vit_small,
        "base": dinov2_vit.vit_base,
        "large": dinov2_vit.vit_large,
        "giant": dinov2_vit.vit_giant2,
    }[size]
    ffn = "swiglufused" if size == "giant" else "mlp"
    hub = _meta_state(
        lambda: build(
            img_size=518, patch_size=14, init_values=1.0, block_chunks=0, ffn_layer=ffn, drop_path_uniform=True
        )
    )
    import timm

    reg = _meta_state(lambda: timm.create_model(f"vit_{size}_patch14_reg4_dinov2", pretrained=False, num_classes=0))
    if size == "giant":  # timm names DINOv2's SwiGLU w12 / w3 as fc1 / fc2
        reg = {k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3"): v for k, v in reg.items()}
    for arch, state, layout in [
        (f"vit_{size}_patch14_dinov2", hub, "dinov2"),
        (f"vit_{size}_patch14_reg4_dinov2", reg, "timm"),
    ]:
        abstract = nnx.eval_shape(lambda arch=arch: VisionTransformer(get_arch(arch), rngs=nnx.Rngs(0)))
        ours = param_shapes(abstract)
        theirs = {path: value.shape for path, value in torch_params(state, layout=layout).items()}
        if layout == "timm":  # timm has no mask_token
            ours.pop(("mask_token",))
        assert ours == theirs


def test_bfloat16_compute_stays_close_and_fp32_outputs(dinov2_small):
    ref, model = dinov2_small
    x = _image((98, 98), seed=8)
    bf16 = _pair("vit_small_patch14_dinov2", ref, "dinov2", dtype="bfloat16")
    out32, out16 = _jax_forward(model, x), _jax_forward(bf16, x)
    assert out16["x_norm_patchtokens"].dtype == jax.numpy.float32
    assert out16["x_prenorm"].dtype == jax.numpy.float32
    cos = np.sum(np.asarray(out16["x_norm_patchtokens"]) * np.asarray(out32["x_norm_patchtokens"]), -1)
    cos /= np.linalg.norm(out16["x_norm_patchtokens"], axis=-1) * np.linalg.norm(out32["x_norm_patchtokens"], axis=-1)
    assert cos.min() > 0.99
    assert relative_error(out16["x_norm_patchtokens"], out32["x_norm_patchtokens"]) > 1e-4  # really bf16


def _check_gradients(ref, model, x, seed, tol):
    """Parameter gradients of a random linear loss on patch and CLS tokens, ours vs the official code's."""
    batch, (height, width) = x.shape[0], x.shape[1:3]
    rng = np.random.default_rng(seed)
    dim = model.config.embed_dim
    w_patch = rng.standard_normal((batch, (height // 14) * (width // 14), dim)).astype(np.float32)
    w_cls = rng.standard_normal((batch, dim)).astype(np.float32)

    ref.zero_grad(set_to_none=True)
    out = ref.forward_features(_nchw(x))
    loss = (out["x_norm_patchtokens"] * torch.from_numpy(w_patch)).sum() + (
        out["x_norm_clstoken"] * torch.from_numpy(w_cls)
    ).sum()
    loss.backward()
    expected = torch_params(
        {name: p.grad if p.grad is not None else torch.zeros_like(p) for name, p in ref.named_parameters()},
        layout="dinov2",
    )
    ref.zero_grad(set_to_none=True)

    def jax_loss(m):
        o = m(x)
        return jax.numpy.sum(o["x_norm_patchtokens"] * w_patch) + jax.numpy.sum(o["x_norm_clstoken"] * w_cls)

    grads = nnx.jit(nnx.grad(jax_loss))(model)
    ours = {tuple(str(p) for p in path): np.asarray(v[...]) for path, v in nnx.to_flat_state(grads)}
    assert set(ours) == set(expected)
    errors = {"/".join(k): relative_error(ours[k], expected[k]) for k in expected if np.abs(expected[k]).max() > 0}
    print(f"worst gradient error: {max(errors.values()):.2e} ({max(errors, key=errors.get)})")
    assert max(errors.values()) <= tol, errors
    np.testing.assert_array_equal(ours[("mask_token",)], 0.0)


def test_gradients_match_official():
    """Through the pos-embed resampling (70x42 input), 2 blocks of 48, batch 2."""
    from dinov2.models.vision_transformer import DinoVisionTransformer

    ref = DinoVisionTransformer(
        img_size=56, patch_size=14, embed_dim=48, depth=2, num_heads=2, init_values=1.0, block_chunks=0
    )
    ref = randomize(ref, seed=9).eval()
    model = _pair("vit_tiny_test", ref, "dinov2", embed_dim=48)
    _check_gradients(ref, model, _image((70, 42), seed=10, batch=2), seed=11, tol=GRADIENT_TOL)


def test_gradients_of_the_full_vit_s14_match_official(dinov2_small):
    """ViT-S/14 at its real width and depth (384 wide, 12 blocks, 6 heads) on a 42x28 image (3x2 patches, the
    518 px table resampled), batch 1: what 12 blocks of rounding do to the gradients."""
    ref, model = dinov2_small
    _check_gradients(ref, model, _image((42, 28), seed=13), seed=14, tol=GRADIENT_TOL_FULL)


def test_border_pixels_beyond_the_patch_grid_are_dropped():
    """As the stride-p patch convolution of NeCo's DINO ViT (98 px crops at patch 16): 75x45 acts as 70x42."""
    model = VisionTransformer(get_arch("vit_tiny_test"), rngs=nnx.Rngs(0))
    x = _image((75, 45), seed=12)
    full, cropped = _jax_forward(model, x), _jax_forward(model, x[:, :70, :42])
    np.testing.assert_array_equal(full["x_prenorm"], cropped["x_prenorm"])
