"""Weight files and saved folders fed in wrong: each refused with one line that names the thing, nothing on disk
lost or overwritten; and the architecture recorded in every export, so that no head count is ever guessed.

The reference for the demo-sized ViT (width 64, two heads: a head count that 64-wide heads would get wrong) is
the official `dinov2` code with random weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from programs import run_program
from reference_models import randomize, relative_error

import neco_jax
from neco_jax import errors
from neco_jax.convert import arch_record, torch_io
from neco_jax.errors import UserError
from neco_jax.models import get_arch

# Relative error of a loaded file vs its reference: measured <= 8.9e-7; the bound is 3x.
TOL = 2.7e-6
IMG = 56  # vit_tiny_test's native size (a 4 x 4 position table)


def _tiny_reference(seed=0):
    """The official DINOv2 ViT with vit_tiny_test's shape: width 64, 2 heads, 2 blocks, patch 14 at 56 px."""
    from dinov2.models.vision_transformer import DinoVisionTransformer

    model = DinoVisionTransformer(
        img_size=IMG, patch_size=14, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4, init_values=1.0, block_chunks=0
    )
    return randomize(model, seed).eval()


def _image(seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 3, IMG, IMG), dtype=np.float32)


def _patches_jax(model, x) -> np.ndarray:
    return np.asarray(model(jnp.asarray(x.transpose(0, 2, 3, 1)))["x_norm_patchtokens"])


@torch.no_grad()
def _patches_torch(model, x) -> np.ndarray:
    return model.forward_features(torch.from_numpy(x))["x_norm_patchtokens"].numpy()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_exit_2(argv, capsys) -> str:
    assert run_program("neco_jax.convert", *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The reference model, its plain state dict (no recorded architecture) as .pth, and a working folder."""
    folder = tmp_path_factory.mktemp("tiny")
    reference = _tiny_reference()
    torch.save(reference.state_dict(), folder / "plain.pth")
    return reference, folder / "plain.pth"


# --- 8: bfloat16 / float16 safetensors ---------------------------------------------------------------------


def test_bf16_and_fp16_safetensors_read_without_jax_or_torch(tmp_path):
    from safetensors.torch import save_file

    values = torch.randn(3, 5) * 1e3
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        save_file({"w": values.to(dtype)}, tmp_path / f"{name}.safetensors")
    # A fresh interpreter in which neither JAX nor torch can be imported: what a converter run sees when it
    # reads a file before anything imported JAX (the failure the fix removes).
    script = (
        "import sys; sys.modules['torch'] = None; sys.modules['jax'] = None\n"
        "import numpy as np\n"
        "from neco_jax.convert import torch_io\n"
        f"folder = r'{tmp_path}'\n"
        "for name in ('bf16', 'fp16'):\n"
        "    np.save(f'{folder}/{name}.npy', torch_io.read_state_dict(f'{folder}/{name}.safetensors')['w'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    assert result.returncode == 0, result.stderr
    bf16, fp16 = np.load(tmp_path / "bf16.npy"), np.load(tmp_path / "fp16.npy")
    assert bf16.dtype == np.float32 and fp16.dtype == np.float16  # bfloat16 widened exactly, float16 kept
    np.testing.assert_array_equal(bf16, values.to(torch.bfloat16).float().numpy())
    np.testing.assert_array_equal(fp16, values.to(torch.float16).numpy())


# --- 9: integer, bool and complex tensors -------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_non_float_tensors_are_refused_by_key(tiny, tmp_path, suffix):
    reference, _ = tiny
    state = dict(reference.state_dict()) | {
        "step": torch.tensor([7]),
        "valid": torch.ones(2, dtype=torch.bool),
        "phase": torch.ones(2, dtype=torch.complex64),
    }
    path = tmp_path / f"mixed{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, path)
    before = path.read_bytes()
    with pytest.raises(errors.CheckpointError) as info:
        neco_jax.load_backbone(path)
    message = str(info.value)
    assert "not floating point" in message and "\n" not in message
    for key in ("'step'", "'valid'", "'phase'"):
        assert key in message, message
    assert "blocks.0" not in message  # the float tensors are not named
    assert path.read_bytes() == before


# --- 10: the architecture: recorded in exports, never guessed, checked against the weights -------------------


def test_unrecorded_file_of_a_width_without_known_heads_is_refused(tiny, tmp_path, capsys):
    reference, plain = tiny
    with pytest.raises(UserError, match=r"width 64 is none of the DINO/DINOv2 sizes.*--arch"):
        neco_jax.load_backbone(plain)
    err = _one_line_exit_2(["to-jax", str(plain), "--out", str(tmp_path / "out")], capsys)
    assert "number of heads is unknown" in err and not (tmp_path / "out").exists()
    # Named, it loads and matches the reference (two heads; 64-wide heads would give one).
    model = neco_jax.load_backbone(plain, arch="vit_tiny_test")
    assert model.config.num_heads == 2
    assert relative_error(_patches_jax(model, _image()), _patches_torch(reference, _image())) <= TOL


def test_every_export_records_its_architecture(tiny, tmp_path, capsys):
    reference, plain = tiny
    assert (
        run_program("neco_jax.convert", "to-jax", str(plain), "--out", str(tmp_path / "jax"), "--arch", "vit_tiny_test")
        == 0
    )
    x = _image(1)
    expected = _patches_torch(reference, x)
    for name in ("w.pth", "w.safetensors"):
        assert (
            run_program(
                "neco_jax.convert",
                "to-torch",
                str(tmp_path / "jax"),
                "--out",
                str(tmp_path / name),
                "--layout",
                "dinov2",
            )
            == 0
        )
        assert "architecture recorded in the file" in capsys.readouterr().out
        model = neco_jax.load_backbone(tmp_path / name)  # no arch: the file says what it is
        assert model.config == get_arch("vit_tiny_test")
        assert relative_error(_patches_jax(model, x), expected) <= TOL
    # The record does not disturb PyTorch: a strict load of the .pth as torch.load returns it.
    fresh = _tiny_reference(seed=5)
    fresh.load_state_dict(torch.load(tmp_path / "w.pth", weights_only=True), strict=True)
    np.testing.assert_array_equal(_patches_torch(fresh, x), expected)
    # Training's export goes through the same writer.
    from neco_jax.convert import export_file

    converted = neco_jax.backbone_io.load_converted(tmp_path / "jax")
    export_file(converted.config, converted.params, "timm", tmp_path / "t.safetensors")
    assert neco_jax.load_backbone(tmp_path / "t.safetensors").config.num_heads == 2


def test_a_config_that_disagrees_with_the_weights_is_refused(tiny, tmp_path):
    _, plain = tiny
    neco_jax.save_backbone(neco_jax.load_backbone(plain, arch="vit_tiny_test"), tmp_path / "saved")
    # A recorded architecture that is not the weights' (here: another depth and patch size).
    state = torch_io.read_state_dict(plain)
    wrong = arch_record.metadata_for(get_arch("vit_tiny_test", depth=3, patch_size=16))
    torch_io.write_state_dict(state, tmp_path / "wrong.safetensors", wrong)
    with pytest.raises(errors.CheckpointError) as info:
        neco_jax.load_backbone(tmp_path / "wrong.safetensors")
    message = str(info.value)
    assert "wrong.safetensors: the architecture recorded in the file disagrees with the weights" in message
    assert "patch_size 16 (weights: 14)" in message and "depth 3 (weights: 2)" in message
    # A saved folder whose config.json was edited.
    config_file = tmp_path / "saved" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "embed_dim": 128}))
    before = _snapshot(tmp_path / "saved")
    with pytest.raises(
        errors.CheckpointError,
        match=r"config.json disagrees with the weights: embed_dim 128 "
        r"\(weights: 64\)",
    ):
        neco_jax.load_backbone(tmp_path / "saved")
    assert _snapshot(tmp_path / "saved") == before


# --- 11: pickles that hold code (every format, protocol and place: tests/test_hostile_pickles.py) -----------


class _RunsACommand:
    """Pickles as a call to os.system."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_with_code_is_named_as_such(tiny, tmp_path):
    reference, _ = tiny
    marker = tmp_path / "ran"
    torch.save({**reference.state_dict(), "extra": _RunsACommand(marker)}, tmp_path / "hostile.pth")
    with pytest.raises(errors.CheckpointError) as info:
        neco_jax.load_backbone(tmp_path / "hostile.pth")
    message = str(info.value)
    assert f"names the Python object {os.system.__module__}.system, which is not on neco_jax's allow-list" in message
    assert "could run code from the file" in message and "truncated" not in message
    assert not marker.exists()
    # A whole pickled module (not its state dict) is refused by its class, before anything of it is built.
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")
    with pytest.raises(errors.CheckpointError, match=r"names the Python object torch.nn.modules.linear.Linear, "):
        neco_jax.load_backbone(tmp_path / "module.pth")


# --- non-finite weights ----------------------------------------------------------------------------------------


def test_to_jax_refuses_non_finite_weights_unless_allowed(tiny, tmp_path, capsys):
    reference, _ = tiny
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    state["blocks.1.attn.qkv.weight"][0, 3] = float("nan")
    state["norm.bias"][5] = float("inf")
    torch.save(state, tmp_path / "diverged.pth")
    argv = ["to-jax", str(tmp_path / "diverged.pth"), "--out", str(tmp_path / "out"), "--arch", "vit_tiny_test"]
    err = _one_line_exit_2(argv, capsys)
    assert "diverged.pth holds NaN or infinite values in 2 tensor(s): blocks/1/attn/qkv/kernel, norm/bias;" in err
    assert "--allow_nonfinite" in err and not (tmp_path / "out").exists()
    assert run_program("neco_jax.convert", *argv, "--allow_nonfinite") == 0
    warning = capsys.readouterr().err
    assert warning.startswith("warning: ") and warning.count("\n") == 1
    assert "2 tensor(s): blocks/1/attn/qkv/kernel, norm/bias; converted anyway (--allow_nonfinite)" in warning
    converted = neco_jax.backbone_io.load_converted(tmp_path / "out")
    assert np.isnan(converted.params["blocks/1/attn/qkv/kernel"]).sum() == 1
    assert np.isposinf(converted.params["norm/bias"][5])


# --- 12: head.json, and --out naming something that exists -------------------------------------------------


@pytest.fixture()
def folder_with_head(tiny, tmp_path):
    from flax import nnx

    from neco_jax.models import ProjectionHead

    _, plain = tiny
    head = ProjectionHead(64, hidden_dim=32, out_dim=16, num_layers=2, rngs=nnx.Rngs(0))
    neco_jax.save_backbone(neco_jax.load_backbone(plain, arch="vit_tiny_test"), tmp_path / "f", head=head)
    return tmp_path / "f"


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"in_dim": 64, "hidden_dim": 32,', r"head.json is not readable JSON \(Expecting"),
        (
            '{"in_dim": 64, "hidden_dim": 32, "out_dim": 16, "num_layers": 2, "norm": true}',
            r"head.json is not a projection head config: unknown field\(s\) \['norm'\]",
        ),
        (
            '{"in_dim": 64, "hidden_dim": 32, "out_dim": "16"}',
            r"missing field\(s\) \['num_layers'\]; non-positive or non-integer field\(s\) \['out_dim'\]",
        ),
    ],
)
def test_bad_head_json_is_one_line(folder_with_head, capsys, text, expected):
    (folder_with_head / "head.json").write_text(text)
    before = _snapshot(folder_with_head)
    with pytest.raises(UserError, match=expected):
        neco_jax.backbone_io.load_head(folder_with_head)
    err = _one_line_exit_2(
        ["to-torch", str(folder_with_head), "--out", str(folder_with_head.parent / "x.pth"), "--layout", "dinov2"],
        capsys,
    )
    assert "head.json" in err and not (folder_with_head.parent / "x.pth").exists()
    assert _snapshot(folder_with_head) == before


def test_out_naming_an_existing_file_or_filled_folder_is_refused(folder_with_head, tiny, capsys):
    _, plain = tiny
    existing = folder_with_head.parent / "keep.pth"
    existing.write_bytes(b"an earlier export")
    err = _one_line_exit_2(["to-torch", str(folder_with_head), "--out", str(existing), "--layout", "dinov2"], capsys)
    assert "keep.pth already exists" in err and existing.read_bytes() == b"an earlier export"
    err = _one_line_exit_2(["to-jax", str(plain), "--out", str(existing), "--arch", "vit_tiny_test"], capsys)
    assert "is an existing file" in err and existing.read_bytes() == b"an earlier export"
    before = _snapshot(folder_with_head)
    err = _one_line_exit_2(["to-jax", str(plain), "--out", str(folder_with_head), "--arch", "vit_tiny_test"], capsys)
    assert "is a folder that is not empty" in err and _snapshot(folder_with_head) == before


# --- 13: permissions of saved folders -----------------------------------------------------------------------


def test_saved_folders_get_umask_permissions(tiny, tmp_path):
    _, plain = tiny
    old = os.umask(0o027)
    try:
        neco_jax.save_backbone(neco_jax.load_backbone(plain, arch="vit_tiny_test"), tmp_path / "saved")
        assert (
            run_program(
                "neco_jax.convert", "to-jax", str(plain), "--out", str(tmp_path / "cli"), "--arch", "vit_tiny_test"
            )
            == 0
        )
        out = str(tmp_path / "w.pth")
        assert (
            run_program("neco_jax.convert", "to-torch", str(tmp_path / "cli"), "--out", out, "--layout", "dinov2") == 0
        )
    finally:
        os.umask(old)
    files = [*(tmp_path / "saved").iterdir(), *(tmp_path / "cli").iterdir(), tmp_path / "w.pth"]
    assert len(files) == 5
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o640, (path, oct(path.stat().st_mode))
