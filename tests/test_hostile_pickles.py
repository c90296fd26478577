"""No weight file runs code: every pickled file, in either of torch's formats, at every pickle protocol and with
the payload anywhere (top level, inside a state dict, in Lightning's hyper-parameters, in the legacy format's
header or a persistent id), is refused before anything in it is built, with one line naming what it names; every
entry point that reads weights goes through the one allow-list (neco_jax/convert/safe_pickle.py); and the
layouts that real tools write still load.

Each hostile file is checked to be a real attack: the same file loaded by an unrestricted torch.load creates its
marker file.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
from collections import OrderedDict
from pathlib import Path

import eval_fixtures
import numpy as np
import pytest
import torch
from pickle_files import (
    HEADER_SPOTS,
    SPOTS,
    RunsCode,
    hostile_file,
    lightning_checkpoint,
    neco_hyper_parameters,
    save,
)
from programs import run_program
from reference_models import randomize
from train_fixtures import tiny_settings

import neco_jax
from neco_jax.convert import safe_pickle, torch_io
from neco_jax.errors import CheckpointError

REPO = Path(__file__).resolve().parents[1]
CASES = [(legacy, spot) for legacy in (False, True) for spot in SPOTS if legacy or spot not in HEADER_SPOTS]
REFUSED = "names the Python object builtins.exec, which is not on neco_jax's allow-list"


def _refused(read, *args, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        read(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def _runs_unrestricted(path: Path, marker: Path) -> None:
    """The file is a real attack: torch.load without restriction runs it (whatever it raises afterwards)."""
    with contextlib.suppress(Exception):
        torch.load(path, weights_only=False)
    assert marker.read_text() == "ran", path


@pytest.mark.parametrize("protocol", range(6))
@pytest.mark.parametrize("legacy, spot", CASES, ids=[f"{'legacy' if lg else 'zip'}-{s}" for lg, s in CASES])
def test_no_hostile_file_runs_code(tmp_path, legacy, spot, protocol):
    marker = tmp_path / "ran"
    path = hostile_file(tmp_path, legacy, protocol, spot, marker)
    assert f"{path} {REFUSED}" in _refused(torch_io.read_weights, path)
    assert not marker.exists()
    _runs_unrestricted(path, marker)


@pytest.mark.parametrize("protocol", range(1, 6))  # protocol 0 spells persistent ids as text, never a tuple
def test_a_payload_in_a_legacy_persistent_id_runs_nothing(tmp_path, protocol):
    """torch's legacy reader hands persistent ids of type "module" back as they are; the payload inside one is
    refused when it is built, before torch's reader sees it."""
    marker, path = tmp_path / "ran", tmp_path / "pid.pth"
    slot = object()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("module", RunsCode(marker), "", "") if obj is slot else None

    with open(path, "wb") as f:
        for header in (torch.serialization.MAGIC_NUMBER, torch.serialization.PROTOCOL_VERSION, {}):
            pickle.dump(header, f, protocol=protocol)
        Pickler(f, protocol=protocol).dump({"cls_token": slot})
        pickle.dump([], f, protocol=protocol)
    assert REFUSED in _refused(torch_io.read_weights, path)
    assert not marker.exists()
    _runs_unrestricted(path, marker)


def test_torchscript_and_tar_archives_are_refused_unopened(tmp_path, monkeypatch):
    """torch.load hands a TorchScript archive to torch.jit.load (which runs its code) and extracts a tar-format
    file to disk: neither reaches torch.load."""
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "scripted.pt")
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load was called"))
    assert "scripted.pt is a TorchScript archive" in _refused(torch_io.read_weights, tmp_path / "scripted.pt")
    marker, path = tmp_path / "ran", tmp_path / "old.pth"
    with tarfile.open(path, "w") as tar:  # the tar format's first member: the number of storages, pickled
        data = pickle.dumps(RunsCode(marker), protocol=2)
        info = tarfile.TarInfo("storages")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    assert "old.pth is in PyTorch's oldest format (a tar archive" in _refused(torch_io.read_weights, path)
    assert not marker.exists()
    monkeypatch.undo()
    _runs_unrestricted(path, marker)


def test_allowed_names_cannot_corrupt_memory_or_torch(tmp_path):
    """What a file may name is harmless whatever it is called with: NumPy would build an object array from the
    file's bytes as pointers (crashing the interpreter when read), so NumPy values are empty stand-ins; and a
    BUILD on an allowed function (here: new defaults for torch's tensor rebuilder) changes a throwaway wrapper."""
    pointers = pickle.dumps({"x": _NumpyFromBytes()}, protocol=2)
    assert type(safe_pickle.loads(pointers)["x"]).__name__ == "NumpyValue"  # no repr: a real one would crash it
    defaults = torch._utils._rebuild_tensor_v2.__defaults__
    build = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00__defaults__(\x88ts\x86b."
    with contextlib.suppress(pickle.UnpicklingError, TypeError):
        safe_pickle.loads(build)
    assert torch._utils._rebuild_tensor_v2.__defaults__ == defaults


class _NumpyFromBytes:
    def __reduce__(self):
        return np.ndarray, ((1,), np.dtype("O"), b"A" * 8)


# --- every entry point ----------------------------------------------------------------------------------------


def test_the_issue_file_is_refused_by_the_convert_cli(tmp_path):
    """The issue's reproduction as a user runs it: the payload writes ./pwned into the working directory."""
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"a": RunsCode(Path("pwned"))}, protocol=2))
    result = subprocess.run(
        [sys.executable, "-m", "neco_jax.convert", "to-jax", "evil.pth", "--out", "o"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert last.startswith(f"error: evil.pth {REFUSED}"), last
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "o").exists()


def test_every_reader_of_weights_refuses_a_hostile_file(tmp_path, capsys, monkeypatch):
    """load_backbone (a file, a file URL, a NeCo checkpoint's teacher, a transformers folder's
    pytorch_model.bin), the convert CLI, training's model.init, evaluation's --config.checkpoint and the
    CBFE attention files: each refuses, nothing runs."""
    import transformers

    from evaluation import cbfe
    from neco_jax import weights

    marker = tmp_path / "ran"
    ckpt = hostile_file(tmp_path, False, 2, "hyper-parameters", marker)
    legacy = hostile_file(tmp_path, True, 2, "legacy header: sys info", marker)
    hf_folder = tmp_path / "hf"
    transformers.Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=14).to_json_file(
        tmp_path / "config.json"
    )
    hf_folder.mkdir()
    (tmp_path / "config.json").rename(hf_folder / "config.json")
    hostile_file(tmp_path, False, 4, "state dict", marker).rename(hf_folder / "pytorch_model.bin")
    monkeypatch.setenv("NECO_JAX_CACHE", str(tmp_path / "cache"))

    for source in (ckpt, legacy, ckpt.as_uri(), hf_folder):
        assert REFUSED in _refused(neco_jax.load_backbone, source, which="teacher")
    assert run_program("neco_jax.convert", "to-jax", str(ckpt), "--out", str(tmp_path / "out")) == 2
    assert REFUSED in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert REFUSED in _refused(weights.initial_params, tiny_settings(**{"model.init": str(legacy)}))
    assert REFUSED in _refused(cbfe.read_attention_file, ckpt, 2)
    voc = eval_fixtures.make_voc_dataset(tmp_path / "voc", num_train=2, num_val=2)
    rc = run_program(
        "evaluation",
        f"--config={REPO}/configs/eval/voc_overcluster.py",
        f"--config.checkpoint={ckpt}",
        f"--config.data_dir={voc}",
        f"--config.workdir={tmp_path / 'eval'}",
    )
    assert rc == 2 and REFUSED in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "eval" / "results.json").exists()
    assert not marker.exists()


# --- real layouts still load ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_state():
    """The official DINOv2 ViT at vit_tiny_test's shape (width 64, 2 heads, 2 blocks, patch 14), random."""
    from dinov2.models.vision_transformer import DinoVisionTransformer

    model = DinoVisionTransformer(
        img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=2, init_values=1.0, block_chunks=0
    )
    return OrderedDict((k, v.detach().clone()) for k, v in randomize(model, 0).state_dict().items())


def _assert_same(read: dict, expected: dict) -> None:
    assert list(read) == list(expected)
    for k, v in expected.items():
        np.testing.assert_array_equal(read[k], v.numpy(), err_msg=k)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_hub_style_and_lightning_files_still_load(tiny_state, tmp_path, legacy):
    new_zip = not legacy
    # A hub-style .pth: the state dict itself (an OrderedDict with torch's _metadata), as torch.save writes it.
    save(tiny_state, tmp_path / "hub.pth", _use_new_zipfile_serialization=new_zip)
    _assert_same(torch_io.read_state_dict(tmp_path / "hub.pth"), tiny_state)
    # A NeCo Lightning .ckpt, student (model.) and teacher, hyper-parameters of every kind on the allow-list.
    both = {f"{p}.{k}": v + 1 if p == "teacher" else v for p in ("model", "teacher") for k, v in tiny_state.items()}
    path = save(
        lightning_checkpoint(both, neco_hyper_parameters()),
        tmp_path / "neco.ckpt",
        _use_new_zipfile_serialization=new_zip,
    )
    hyper = torch_io.load_pickled(path)["hyper_parameters"]
    assert hyper["crops_for_assign"] == [0, 1] and hyper["data"] == {"size_crops": [224, 96]}
    assert hyper["args"]["local_crops_scale"] == (0.05, 0.4) and hyper["salt"] == b"\x00\xff"
    assert type(hyper["extra"]["momentum_teacher"]) is safe_pickle.NumpyValue  # NumPy values: kept out
    _assert_same(torch_io.read_state_dict(path), both)
    teacher = neco_jax.backbone_io.load_converted(path, arch="vit_tiny_test", which="teacher")
    np.testing.assert_array_equal(teacher.params["cls_token"], tiny_state["cls_token"].numpy() + 1)
