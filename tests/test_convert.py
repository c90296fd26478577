"""Weight conversion against the reference PyTorch models (official dinov2 code, timm), random weights.

Each case: PyTorch state dict -> JAX (architecture inferred) -> forward parity with the reference at the
model's native size -> export -> strict load into a fresh reference model -> identical outputs, and the
round trip is bit-exact. Reference models are 1-2 blocks deep at 112 px (native: no table resampling).
"""

from __future__ import annotations

import subprocess
import sys
from functools import partial

import jax.numpy as jnp
import numpy as np
import pickle_files
import pytest
import timm
import torch
from programs import run_program
from reference_models import randomize, relative_error

import neco_jax
from neco_jax.backbone_io import load_converted, load_head
from neco_jax.convert import backbone_to_jax, export_state_dict, infer, torch_io
from neco_jax.errors import UserError
from neco_jax.models import get_arch

# Relative error of the converted model vs its reference (and of exports loaded back): measured <= 1.6e-6 (timm
# reg4 registers; tokens 1.5e-6); the bound is 3x.
TOL = 5e-6
IMG = 112  # native size of the DINOv2-layout references below (an 8 x 8 position table)


def _dinov2(seed=0, *, embed_dim=384, num_heads=6, depth=2, **kwargs):
    from dinov2.layers import MemEffAttention
    from dinov2.layers import NestedTensorBlock as Block
    from dinov2.models.vision_transformer import DinoVisionTransformer

    model = DinoVisionTransformer(
        img_size=IMG,
        patch_size=14,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=4,
        init_values=1.0,
        block_fn=partial(Block, attn_class=MemEffAttention),
        **{"block_chunks": 0, **kwargs},
    )
    return randomize(model, seed).eval()


def _timm(name, seed=0, **kwargs):
    return randomize(timm.create_model(name, pretrained=False, num_classes=0, **kwargs), seed).eval()


def _numpy_sd(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _image(size, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 3) + size, dtype=np.float32)


@torch.no_grad()
def _torch_tokens(model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(CLS, patch tokens) after the final norm, from a dinov2 or timm model."""
    t = torch.from_numpy(x)
    if hasattr(model, "forward_features") and hasattr(model, "mask_token"):
        out = model.forward_features(t)
        return out["x_norm_clstoken"].numpy(), out["x_norm_patchtokens"].numpy()
    tokens = model.forward_features(t).numpy()
    return tokens[:, 0], tokens[:, model.num_prefix_tokens :]


def _jax_tokens(model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out = model(jnp.asarray(x.transpose(0, 2, 3, 1)))
    return np.asarray(out["x_norm_clstoken"]), np.asarray(out["x_norm_patchtokens"])


def _check_case(reference, fresh_reference, layout, size=(IMG, IMG), arch=None):
    """The whole contract for one reference model; returns the measured errors."""
    source = _numpy_sd(reference)
    config, params = backbone_to_jax(source, arch)
    model = neco_jax.backbone_io.build(config, params)
    x = _image(size)
    ref_cls, ref_patch = _torch_tokens(reference, x)
    cls, patch = _jax_tokens(model, x)
    errors = {"cls": relative_error(cls, ref_cls), "patch": relative_error(patch, ref_patch)}
    assert errors["cls"] <= TOL and errors["patch"] <= TOL, errors

    exported = export_state_dict(params, layout)
    assert exported.keys() == source.keys()
    for key, value in source.items():
        assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key
    fresh_reference.load_state_dict(
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in exported.items()}, strict=True
    )
    again_cls, again_patch = _torch_tokens(fresh_reference, x)
    np.testing.assert_array_equal(again_cls, ref_cls)
    np.testing.assert_array_equal(again_patch, ref_patch)
    return config, params, errors


def test_dinov2_small_round_trip_and_parity():
    config, _, errors = _check_case(_dinov2(0), _dinov2(1), "dinov2")
    assert (config.embed_dim, config.num_heads, config.depth, config.pos_grid) == (384, 6, 2, 8)
    assert config.layerscale and config.has_mask_token and config.num_register_tokens == 0
    print("dinov2 S/14 parity", errors)


def test_dinov2_base_round_trip_and_parity():
    config, _, errors = _check_case(
        _dinov2(0, embed_dim=768, num_heads=12, depth=1), _dinov2(1, embed_dim=768, num_heads=12, depth=1), "dinov2"
    )
    assert (config.embed_dim, config.num_heads, config.arch) == (768, 12, "vit_base_patch14_dinov2")
    print("dinov2 B/14 parity", errors)


def test_dinov2_swiglu_to_dinov2_and_timm_layouts():
    # ViT-g's feed-forward at a small width: dinov2 (mlp.w12 / mlp.w3) and timm (packed mlp.fc1 / mlp.fc2).
    # Width 128 is no DINOv2 size, so the head count (which no shape shows) is named; the rest is inferred.
    reference = _dinov2(0, embed_dim=128, num_heads=2, depth=1, ffn_layer="swiglufused")
    arch = get_arch("vit_giant_patch14_dinov2", **infer.shape_fields(_numpy_sd(reference)), num_heads=2)
    config, params, errors = _check_case(
        reference, _dinov2(1, embed_dim=128, num_heads=2, depth=1, ffn_layer="swiglufused"), "dinov2", arch=arch
    )
    assert config.ffn_layer == "swiglu" and params["blocks/0/mlp/w12/kernel"].shape == (128, 688)
    print("dinov2 SwiGLU parity", errors)
    from timm.layers import GluMlp

    timm_giant = _timm(
        "vit_giant_patch14_dinov2", embed_dim=128, depth=1, num_heads=2, img_size=IMG, mlp_ratio=688 / 128
    )
    assert isinstance(timm_giant.blocks[0].mlp, GluMlp) and timm_giant.blocks[0].mlp.fc1.out_features == 688
    timm_sd = export_state_dict(params, "timm")
    assert "blocks.0.mlp.fc1.weight" in timm_sd and "mask_token" not in timm_sd
    timm_giant.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in timm_sd.items()}, strict=True)
    x = _image((IMG, IMG))
    ref_cls, ref_patch = _torch_tokens(reference, x)
    cls, patch = _torch_tokens(timm_giant, x)
    assert relative_error(cls, ref_cls) <= TOL and relative_error(patch, ref_patch) <= TOL
    # ... and timm's layout comes back to the same parameters.
    _, from_timm = backbone_to_jax(timm_sd, arch)
    assert from_timm.keys() == set(params) - {"mask_token"}
    assert all(np.array_equal(from_timm[p], params[p]) for p in from_timm)


def test_dinov2_chunked_blocks_read_as_unchunked():
    chunked = _dinov2(0, block_chunks=2)
    assert any(k.startswith("blocks.1.1.") for k in chunked.state_dict())
    _, chunked_params = backbone_to_jax(_numpy_sd(chunked))
    _, plain_params = backbone_to_jax(_numpy_sd(_dinov2(0)))
    assert chunked_params.keys() == plain_params.keys()
    assert all(np.array_equal(chunked_params[p], plain_params[p]) for p in plain_params)


def test_timm_dinov2_round_trip_and_parity():
    config, _, errors = _check_case(
        _timm("vit_small_patch14_dinov2", depth=2, img_size=IMG),
        _timm("vit_small_patch14_dinov2", 1, depth=2, img_size=IMG),
        "timm",
    )
    assert not config.has_mask_token and config.layerscale and config.pos_grid == 8
    print("timm S/14 parity", errors)


def test_timm_reg4_round_trip_parity_and_dinov2_layout():
    reference = _timm("vit_small_patch14_reg4_dinov2", depth=2, img_size=IMG)
    assert reference.pos_embed.shape[1] == 64 and reference.reg_token.shape == (1, 4, 384)
    config, params, errors = _check_case(
        reference, _timm("vit_small_patch14_reg4_dinov2", 1, depth=2, img_size=IMG), "timm"
    )
    assert config.num_register_tokens == 4 and config.pos_grid == 8
    print("timm S/14 reg4 parity", errors)
    # The DINOv2 layout keeps the class position separate; it comes back to the same parameters.
    hub = export_state_dict(params, "dinov2")
    assert hub["pos_embed"].shape == (1, 65, 384) and hub["register_tokens"].shape == (1, 4, 384)
    _, again = backbone_to_jax(hub)
    assert again.keys() == params.keys() and all(np.array_equal(again[p], params[p]) for p in params)
    # Registers come out of the JAX model where DINOv2 puts them, after the final norm.
    out = neco_jax.backbone_io.build(config, params)(jnp.asarray(_image((IMG, IMG)).transpose(0, 2, 3, 1)))
    with torch.no_grad():
        tokens = reference.forward_features(torch.from_numpy(_image((IMG, IMG)))).numpy()
    assert relative_error(out["x_norm_regtokens"], tokens[:, 1:5]) <= TOL


@pytest.mark.parametrize(
    "name, depth, arch",
    [
        ("vit_small_patch16_224", 2, "vit_small_patch16_dino"),
        pytest.param("vit_base_patch8_224", 1, "vit_base_patch8_dino", marks=pytest.mark.slow),
    ],
)
def test_timm_dino_family_round_trip_and_parity(name, depth, arch):
    config, _, errors = _check_case(_timm(name, depth=depth), _timm(name, 1, depth=depth), "timm", size=(224, 224))
    assert config.arch == arch and not config.layerscale and not config.has_mask_token
    print(name, "parity", errors)


def _meta_dinov2(size):
    from dinov2.models import vision_transformer as dinov2_vit

    build = {
        "small": dinov2_vit.vit_small,
        "base": dinov2_vit.vit_base,
        "large": dinov2_vit.vit_large,
        "giant": partial(dinov2_vit.vit_giant2, ffn_layer="swiglufused"),
    }[size]
    return build(patch_size=14, img_size=518, init_values=1.0, block_chunks=0, drop_path_uniform=True)


SIZES = ("small", "base", "large", "giant")
FULL_SIZE = [(partial(_meta_dinov2, s), f"vit_{s}_patch14_dinov2", "dinov2") for s in SIZES]
FULL_SIZE += [
    (partial(timm.create_model, f"vit_{s}_patch14_reg4_dinov2", num_classes=0), f"vit_{s}_patch14_reg4_dinov2", "timm")
    for s in SIZES
]
FULL_SIZE += [
    (partial(timm.create_model, n, num_classes=0), a, "timm")
    for n, a in (
        ("vit_small_patch16_224", "vit_small_patch16_dino"),
        ("vit_small_patch8_224", "vit_small_patch8_dino"),
        ("vit_base_patch16_224", "vit_base_patch16_dino"),
        ("vit_base_patch8_224", "vit_base_patch8_dino"),
    )
]


FULL_SIZE = [
    pytest.param(*case, id=f"{case[1]}-{case[2]}", marks=[pytest.mark.slow] if "giant" in case[1] else [])
    for case in FULL_SIZE
]


@pytest.mark.parametrize("build, arch, layout", FULL_SIZE)
def test_full_size_layouts_match_the_reference_models(build, arch, layout):
    """Every named architecture at full size: the inferred config and the exported key/shape set agree with the
    reference model's state dict (built on the meta device, so nothing is allocated)."""
    from neco_jax.convert import config_for, keymap, param_shapes

    with torch.device("meta"):
        reference = build()
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    config = config_for(reference.state_dict())
    assert config == get_arch(arch, has_mask_token=layout == "dinov2")
    assert keymap.expected_torch_shapes(param_shapes(config), layout) == shapes


# --- NeCo checkpoints ------------------------------------------------------------------------------------


def _torch_head(in_dim, seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(in_dim, 48), torch.nn.GELU(), torch.nn.Linear(48, 48), torch.nn.GELU(), torch.nn.Linear(48, 16)
    )


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory):
    """A NeCo Lightning checkpoint: model.* (student) and teacher.* ViTs, each with a projection head."""
    student, teacher = _dinov2(0, depth=1), _dinov2(1, depth=1)
    heads = {"model.": _torch_head(384, 0), "teacher.": _torch_head(384, 1)}
    state = {}
    for prefix, vit in (("model.", student), ("teacher.", teacher)):
        state.update({prefix + k: v for k, v in vit.state_dict().items()})
        state.update({f"{prefix}projection_head.{k}": v for k, v in heads[prefix].state_dict().items()})
    path = tmp_path_factory.mktemp("ckpt") / "neco.ckpt"
    pickle_files.save(pickle_files.lightning_checkpoint(state, pickle_files.neco_hyper_parameters()), path)
    return path, {"student": student, "teacher": teacher}, {"student": heads["model."], "teacher": heads["teacher."]}


def test_neco_lightning_checkpoint_gives_student_teacher_and_heads(lightning_ckpt):
    path, vits, heads = lightning_ckpt
    x = _image((IMG, IMG))
    for which in ("student", "teacher"):
        converted = load_converted(path, which=which)
        expected = {k: v.numpy() for k, v in vits[which].state_dict().items()}
        exported = export_state_dict(converted.params, "dinov2")
        assert exported.keys() == expected.keys()
        assert all(np.array_equal(exported[k], expected[k]) for k in expected)
        head = load_head(path, which=which)
        features = np.random.default_rng(0).standard_normal((5, 384), dtype=np.float32)
        with torch.no_grad():
            reference = torch.nn.functional.normalize(heads[which](torch.from_numpy(features)), dim=-1).numpy()
        assert relative_error(head(jnp.asarray(features)), reference) <= TOL
    teacher = neco_jax.load_backbone(path, which="teacher")
    assert relative_error(_jax_tokens(teacher, x)[1], _torch_tokens(vits["teacher"], x)[1]) <= TOL


def test_cli_converts_training_checkpoint_and_exports(lightning_ckpt, tmp_path, capsys):
    path, vits, heads = lightning_ckpt
    assert run_program("neco_jax.convert", "to-jax", str(path), "--out", str(tmp_path / "jax")) == 0
    assert (tmp_path / "jax/student/params.safetensors").is_file()
    assert (tmp_path / "jax/teacher/head.safetensors").is_file()
    assert "student" in capsys.readouterr().out
    for suffix in ("pth", "safetensors"):
        out = tmp_path / f"teacher.{suffix}"
        assert (
            run_program(
                "neco_jax.convert", "to-torch", str(tmp_path / "jax/teacher"), "--out", str(out), "--layout", "dinov2"
            )
            == 0
        )
        fresh = _dinov2(5, depth=1)
        loaded = torch_io.read_state_dict(out)
        fresh.load_state_dict({k: torch.from_numpy(v) for k, v in loaded.items()}, strict=True)
        for key, value in vits["teacher"].state_dict().items():
            assert torch.equal(fresh.state_dict()[key], value), key
    # timm has no place for DINOv2's mask_token: it is left out, said so, and timm loads the rest strictly.
    assert (
        run_program(
            "neco_jax.convert",
            "to-torch",
            str(tmp_path / "jax/teacher"),
            "--out",
            str(tmp_path / "timm.pth"),
            "--layout",
            "timm",
        )
        == 0
    )
    assert "left out, no place in the timm layout: mask_token" in capsys.readouterr().out
    timm_model = _timm("vit_small_patch14_dinov2", depth=1, img_size=IMG)
    timm_model.load_state_dict(
        {k: torch.from_numpy(v) for k, v in torch_io.read_state_dict(tmp_path / "timm.pth").items()}, strict=True
    )
    x = _image((IMG, IMG))
    assert relative_error(_torch_tokens(timm_model, x)[1], _torch_tokens(vits["teacher"], x)[1]) <= TOL
    # A folder of two ViTs: pick one.
    model = neco_jax.load_backbone(tmp_path / "jax", which="teacher")
    assert relative_error(_jax_tokens(model, x)[0], _torch_tokens(vits["teacher"], x)[0]) <= TOL


def test_plain_file_with_projection_head(tmp_path):
    vit, head = _dinov2(0, depth=1), _torch_head(384, 3)
    state = dict(vit.state_dict()) | {f"projection_head.{k}": v for k, v in head.state_dict().items()}
    torch.save(state, tmp_path / "neco_release.ckpt")
    converted = load_converted(tmp_path / "neco_release.ckpt")
    assert converted.head_config.out_dim == 16 and converted.head_config.num_layers == 3
    assert neco_jax.backbone_io.locate(tmp_path / "neco_release.ckpt")[0] == tmp_path / "neco_release.ckpt"


def test_safetensors_source_and_save_load_folder(tmp_path):
    from safetensors.torch import save_file

    reference = _timm("vit_small_patch14_reg4_dinov2", depth=1, img_size=IMG)
    save_file(reference.state_dict(), tmp_path / "w.safetensors")
    model = neco_jax.load_backbone(tmp_path / "w.safetensors")
    neco_jax.save_backbone(model, tmp_path / "folder")
    again = neco_jax.load_backbone(tmp_path / "folder")
    assert again.config == model.config
    x = _image((IMG, IMG))
    np.testing.assert_array_equal(_jax_tokens(again, x)[1], _jax_tokens(model, x)[1])
    assert relative_error(_jax_tokens(again, x)[1], _torch_tokens(reference, x)[1]) <= TOL


def test_bfloat16_file_reads_exactly_as_float32(tmp_path):
    state = {k: v.to(torch.bfloat16) for k, v in _dinov2(0, depth=1).state_dict().items()}
    torch.save(state, tmp_path / "half.pth")
    _, params = backbone_to_jax(torch_io.read_state_dict(tmp_path / "half.pth"))
    assert params["cls_token"].dtype == np.float32
    np.testing.assert_array_equal(params["cls_token"], state["cls_token"].float().numpy())


# --- bad inputs: one clear error each ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_pth(tmp_path_factory):
    path = tmp_path_factory.mktemp("pth") / "dinov2_s.pth"
    torch.save(_dinov2(0, depth=1).state_dict(), path)
    return path


def test_truncated_pth_is_a_clear_error(small_pth, tmp_path):
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(small_pth.read_bytes()[: small_pth.stat().st_size // 2])
    with pytest.raises(UserError, match=r"truncated.pth is not a readable PyTorch checkpoint \(truncated download"):
        neco_jax.load_backbone(bad)


def test_text_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "notes.pth"
    bad.write_text("this is not a checkpoint\n")
    with pytest.raises(UserError, match="notes.pth is not a readable PyTorch checkpoint"):
        neco_jax.load_backbone(bad)


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    from safetensors.numpy import save_file

    save_file({"cls_token": np.zeros((1, 1, 8), np.float32)}, tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:20])
    with pytest.raises(UserError, match="cut.safetensors is not a readable safetensors file"):
        neco_jax.load_backbone(tmp_path / "cut.safetensors")


def test_wrong_keys_are_listed_in_one_error(tmp_path):
    state = dict(_dinov2(0, depth=1).state_dict())
    del state["blocks.0.ls2.gamma"]
    state["blocks.0.attn.q_norm.weight"] = torch.ones(64)
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(UserError) as info:
        neco_jax.load_backbone(tmp_path / "odd.pth")
    message = str(info.value)
    assert "missing (1): blocks.0.ls2.gamma" in message
    assert "unexpected (1): blocks.0.attn.q_norm.weight" in message
    assert "\n" not in message


def test_wrong_shapes_are_listed(small_pth):
    with pytest.raises(UserError) as info:
        neco_jax.load_backbone(small_pth, arch="vit_base_patch14_dinov2")
    message = str(info.value)
    assert "shape mismatch (" in message and "blocks.0.attn.proj.bias (384,) vs (768,)" in message
    assert "missing (" in message  # vit_base has 12 blocks, the file one
    assert "Name the right architecture" in message


def test_unknown_arch_name(small_pth):
    with pytest.raises(UserError, match="unknown architecture 'vit_huge'.*vit_small_patch14_dinov2"):
        neco_jax.load_backbone(small_pth, arch="vit_huge")


def test_not_a_vit_state_dict(tmp_path):
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "resnet.pth")
    with pytest.raises(UserError, match="no 'cls_token' among the keys.*conv1.weight"):
        neco_jax.load_backbone(tmp_path / "resnet.pth")


def test_missing_file_and_not_a_folder(tmp_path):
    with pytest.raises(UserError, match="nothing.pth does not exist"):
        neco_jax.load_backbone(tmp_path / "nothing.pth")
    with pytest.raises(UserError, match="is not a saved backbone: it has no config.json"):
        neco_jax.load_backbone(tmp_path)


def test_folder_for_another_architecture(tmp_path):
    model = neco_jax.backbone_io.build(*backbone_to_jax(_numpy_sd(_dinov2(0, depth=1))))
    neco_jax.save_backbone(model, tmp_path / "s")
    with pytest.raises(UserError, match=r"params.safetensors does not fit the architecture: missing \(\d+\)"):
        neco_jax.load_backbone(tmp_path / "s", arch=get_arch("vit_small_patch14_dinov2", pos_grid=8))


def test_cli_user_error_is_one_line_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "neco_jax.convert", "to-jax", str(tmp_path / "missing.pth"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr and "missing.pth does not exist" in result.stderr
