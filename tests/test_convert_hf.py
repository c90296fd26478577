"""The Hugging Face transformers layout, against transformers' own Dinov2Model / Dinov2WithRegistersModel.

Folders come from transformers' `save_pretrained` on randomly initialised (then randomised) tiny models, and
neco_jax's exports are loaded by `from_pretrained`: no missing or unexpected keys, the same final tokens
(last_hidden_state, after the final layer norm) as neco_jax's x_norm_* outputs at the native size and at other
sizes, and a bit-exact round trip. Models: 2 blocks of width 64 at patch 14 on a 4 x 4 position table (56 px).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from programs import run_program
from reference_models import randomize, relative_error
from safetensors.numpy import load_file

import neco_jax
from neco_jax.backbone_io import load_converted
from neco_jax.convert import hf
from neco_jax.errors import UserError

# Relative error vs transformers: measured <= 2.1e-6 (a folder read at another size); the bound is 3x.
TOL = 6.2e-6
NATIVE = (56, 56)
OTHER = [(84, 84), (70, 42)]  # larger square grid; non-square grid from a non-square image
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14)


def _hf_model(registers: int = 0, seed: int = 0, **kwargs):
    if registers:
        cfg = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **TINY, **kwargs)
        model = transformers.Dinov2WithRegistersModel(cfg)
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**TINY, **kwargs))
    return randomize(model, seed).eval()


def _image(size, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 3) + size, dtype=np.float32)


@torch.no_grad()
def _hf_tokens(model, x: np.ndarray) -> np.ndarray:
    return model(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()


def _jax_tokens(model, x: np.ndarray) -> np.ndarray:
    out = model(jnp.asarray(x.transpose(0, 2, 3, 1)))
    regs = out["x_norm_regtokens"]
    return np.concatenate(
        [np.asarray(out["x_norm_clstoken"])[:, None], np.asarray(regs), np.asarray(out["x_norm_patchtokens"])], axis=1
    )


def _from_pretrained(folder, registers: bool):
    cls = transformers.Dinov2WithRegistersModel if registers else transformers.Dinov2Model
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize("registers, kwargs", [(0, {}), (4, {"use_swiglu_ffn": True}), (0, {"use_mask_token": False})])
def test_transformers_folder_loads_with_equal_outputs_at_every_size(tmp_path, registers, kwargs):
    reference = _hf_model(registers, **kwargs)
    reference.save_pretrained(tmp_path / "hf")
    model = neco_jax.load_backbone(tmp_path / "hf")
    cfg = model.config
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.pos_grid, cfg.num_register_tokens) == (64, 2, 2, 4, registers)
    assert (cfg.interpolate_offset, cfg.interpolate_antialias) == (0.0, bool(registers))  # transformers' rule
    assert cfg.has_mask_token == kwargs.get("use_mask_token", True)
    for size in [NATIVE, *OTHER]:
        x = _image(size)
        assert relative_error(_jax_tokens(model, x), _hf_tokens(reference, x)) <= TOL, size

    # to-jax reads the folder too, to the same parameters; exporting it again gives back the same tensors.
    assert run_program("neco_jax.convert", "to-jax", str(tmp_path / "hf"), "--out", str(tmp_path / "jax")) == 0
    first, again = load_converted(tmp_path / "hf"), load_converted(tmp_path / "jax")
    assert again.config == first.config and again.params.keys() == first.params.keys()
    assert all(np.array_equal(again.params[p], first.params[p]) for p in first.params)
    assert (
        run_program(
            "neco_jax.convert", "to-torch", str(tmp_path / "jax"), "--out", str(tmp_path / "hf2"), "--layout", "hf"
        )
        == 0
    )
    written = load_file(tmp_path / "hf2" / hf.WEIGHTS_FILE)
    on_disk = load_file(tmp_path / "hf" / hf.WEIGHTS_FILE)  # as transformers wrote it
    assert written.keys() == on_disk.keys()
    assert all(np.array_equal(written[k], on_disk[k]) for k in on_disk)


def _neco_folder(tmp_path, **overrides):
    """A random neco_jax ViT (DINOv2/NeCo position rule, offset 0.1) saved as a backbone folder."""
    from flax import nnx

    from neco_jax.models import get_arch
    from neco_jax.models.vit import VisionTransformer

    config = get_arch("vit_tiny_test", **overrides)
    model = VisionTransformer(config, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(0)  # vectors (norm scales, biases, layer scales) around 1, the rest around 0
    nnx.update(
        model,
        jax.tree.map(
            lambda v: jnp.asarray(0.3 * rng.standard_normal(v.shape, dtype=np.float32) + (v.ndim == 1)),
            nnx.state(model, nnx.Param),
        ),
    )
    neco_jax.save_backbone(model, tmp_path / "neco")
    return model


@pytest.mark.parametrize(
    "overrides", [{}, {"num_register_tokens": 2, "ffn_layer": "swiglu", "has_mask_token": False}, {"layerscale": False}]
)
def test_export_loads_in_transformers_with_equal_outputs(tmp_path, overrides):
    model = _neco_folder(tmp_path, **overrides)
    registers = bool(overrides.get("num_register_tokens"))
    assert (
        run_program(
            "neco_jax.convert", "to-torch", str(tmp_path / "neco"), "--out", str(tmp_path / "hf"), "--layout", "hf"
        )
        == 0
    )
    reference = _from_pretrained(tmp_path / "hf", registers)

    # Native size: the table is used as it is, so the outputs agree.
    x = _image(NATIVE)
    assert relative_error(_jax_tokens(model, x), _hf_tokens(reference, x)) <= TOL
    # Other sizes: NeCo's rule (scale_factor (h + 0.1) / G) and transformers' (size=(h, w)) resample the table
    # differently; with transformers' rule the outputs agree again.
    hf_rule = neco_jax.backbone_io.build(
        dataclasses.replace(model.config, interpolate_offset=0.0, interpolate_antialias=registers),
        neco_jax.convert.flat_params(model),
    )
    for size in OTHER:
        x = _image(size)
        expected = _hf_tokens(reference, x)
        assert relative_error(_jax_tokens(model, x), expected) > 1e-3, size
        assert relative_error(_jax_tokens(hf_rule, x), expected) <= TOL, size

    # The folder comes back bit-exact, with the architecture it was exported from (its record in config.json).
    back = load_converted(tmp_path / "hf")
    original = load_converted(tmp_path / "neco")
    assert back.config == original.config
    assert back.params.keys() == original.params.keys()
    assert all(np.array_equal(back.params[p], original.params[p]) for p in original.params)


def test_sharded_and_pickled_folders_read_the_same(tmp_path):
    model = _hf_model(seed=1)
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "shards", max_shard_size="20KB")
    assert (tmp_path / "shards" / hf.SHARD_INDEX_FILE).is_file()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    # Older hub folders hold pytorch_model.bin, and task models keep the ViT under the model_type prefix beside
    # their task head (Dinov2ForImageClassification's classifier), which is not part of the backbone.
    task = {f"dinov2.{k}": torch.from_numpy(v) for k, v in load_file(tmp_path / "one" / hf.WEIGHTS_FILE).items()}
    task.update({"classifier.weight": torch.zeros(3, 2 * model.config.hidden_size), "classifier.bias": torch.zeros(3)})
    torch.save(task, tmp_path / "bin" / hf.PICKLE_WEIGHTS_FILE)
    one = load_converted(tmp_path / "one")
    for other in (load_converted(tmp_path / "shards"), load_converted(tmp_path / "bin")):
        assert other.config == one.config and other.params.keys() == one.params.keys()
        assert all(np.array_equal(other.params[p], one.params[p]) for p in one.params)


def test_bad_folders_and_outputs_are_one_line_errors(tmp_path, capsys):
    _hf_model().save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    # --out that already holds a model, or names a file.
    assert (
        run_program(
            "neco_jax.convert", "to-torch", str(tmp_path / "hf"), "--out", str(tmp_path / "hf"), "--layout", "hf"
        )
        == 2
    )
    assert "already exists" in capsys.readouterr().err
    assert (
        run_program(
            "neco_jax.convert",
            "to-torch",
            str(tmp_path / "hf"),
            "--out",
            str(tmp_path / "x.safetensors"),
            "--layout",
            "hf",
        )
        == 2
    )
    assert "the hf layout is a folder" in capsys.readouterr().err
    # A config neco_jax's ViT cannot run, and a record that disagrees with the transformers fields.
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    with pytest.raises(UserError, match="hidden_act is 'relu'; neco_jax's ViT has hidden_act='gelu' only"):
        neco_jax.load_backbone(tmp_path / "hf")
    record = dataclasses.asdict(hf.vit_config(config, "x"))
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, hf.RECORD_KEY: {**record, "num_heads": 4}}))
    with pytest.raises(UserError, match=r"disagrees with the transformers fields \(num_heads 4 vs 2\)"):
        neco_jax.load_backbone(tmp_path / "hf")
    # Weights that do not fit the config are listed.
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(UserError, match=r"missing \(\d+\): encoder\.layer\.2\."):
        neco_jax.load_backbone(tmp_path / "hf")
    # A non-integer mlp_ratio has no place in transformers' config.
    _neco_folder(tmp_path, mlp_ratio=2.5)
    assert (
        run_program(
            "neco_jax.convert", "to-torch", str(tmp_path / "neco"), "--out", str(tmp_path / "out"), "--layout", "hf"
        )
        == 2
    )
    assert "mlp_ratio 2.5 has no place in the hf layout" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
