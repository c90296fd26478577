"""Pickled PyTorch files for the unpickler tests: the layouts real tools write, and hostile files.

`lightning_checkpoint` lays a checkpoint out as Lightning 2.6 writes one for NeCo's LightningModule (checked
against a file written by lightning 2.6.6 for a module whose list arguments came from a sacred 0.8.7 config,
as NeCo's `experiments/train_with_neco.py` passes them: it names exactly collections.OrderedDict,
torch.FloatStorage, torch._utils._rebuild_tensor_v2 and sacred.config.custom_containers.ReadOnlyList). Neither
package is a test dependency: `save` writes classes that pickle under those packages' names the way theirs do.

`hostile_file` writes a file that runs code when it is unpickled without restriction, in either of torch's
formats, at any pickle protocol, with the payload at one of `SPOTS`.
"""

from __future__ import annotations

import argparse
import pickle
import sys
import types
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch


def _named(module: str, base: type, name: str, reduce=None) -> type:
    attrs = {"__module__": module, "__qualname__": name}
    if reduce is not None:
        attrs["__reduce__"] = reduce
    return type(name, (base,), attrs)


# sacred's read-only config containers pickle as a call of their class on a plain copy (custom_containers.py).
ReadOnlyList = _named("sacred.config.custom_containers", list, "ReadOnlyList", lambda s: (type(s), (list(s),)))
ReadOnlyDict = _named("sacred.config.custom_containers", dict, "ReadOnlyDict", lambda s: (type(s), (dict(s),)))
# Lightning's AttributeDict is a plain dict subclass with attribute access: default pickling.
AttributeDict = _named("lightning.fabric.utilities.data", dict, "AttributeDict")


@contextmanager
def _importable(*classes: type):
    """Make each class importable under its module's name while a file is written (pickle checks that it is)."""
    added = []
    for cls in classes:
        parts = cls.__module__.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name not in sys.modules:
                sys.modules[name] = types.ModuleType(name)
                added.append(name)
        setattr(sys.modules[cls.__module__], cls.__qualname__, cls)
    try:
        yield
    finally:
        for name in added:
            del sys.modules[name]


def save(obj, path: Path, **kwargs) -> Path:
    """torch.save, with the stand-ins of sacred's and Lightning's classes importable under their names."""
    with _importable(ReadOnlyList, ReadOnlyDict, AttributeDict):
        torch.save(obj, path, **kwargs)
    return path


def lightning_checkpoint(state_dict, hyper_parameters) -> dict:
    """A checkpoint as Lightning 2.6 lays out NeCo's (one optimizer, a cosine schedule, ModelCheckpoint)."""
    some = next(iter(state_dict.values()))
    return {
        "epoch": 0,
        "global_step": 2,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": OrderedDict(state_dict),
        "loops": {
            "fit_loop": {
                "state_dict": {},
                "epoch_loop.state_dict": {"_batches_that_stepped": 2},
                "epoch_progress": {"total": {"ready": 1, "completed": 0, "started": 1, "processed": 1}},
            }
        },
        "callbacks": {
            "ModelCheckpoint{'monitor': None, 'mode': 'min', 'every_n_train_steps': 0, 'every_n_epochs': 1, "
            "'train_time_interval': None}": {
                "monitor": None,
                "best_model_score": None,
                "best_model_path": "/runs/neco/epoch=0-step=2.ckpt",
                "best_k_models": {},
                "kth_value": torch.tensor(float("inf")),
            }
        },
        "optimizer_states": [
            {
                "state": {0: {"step": torch.tensor(2.0), "exp_avg": torch.zeros_like(some)}},
                "param_groups": [{"lr": 9e-4, "betas": (0.9, 0.999), "weight_decay": 0.04, "foreach": None}],
            }
        ],
        "lr_schedulers": [{"T_max": 10, "eta_min": 0.0, "base_lrs": [0.001], "last_epoch": 2, "_last_lr": [9e-4]}],
        "hparams_name": "kwargs",
        "hyper_parameters": hyper_parameters,
    }


def neco_hyper_parameters() -> dict:
    """Hyper-parameters of the kinds NeCo's and other training checkpoints hold (see the allow-list)."""
    return {
        "lr_backbone": 1e-5,
        "crops_for_assign": ReadOnlyList([0, 1]),
        "nmb_crops": ReadOnlyList([2, 4]),
        "data": ReadOnlyDict({"size_crops": [224, 96]}),
        "extra": AttributeDict(momentum_teacher=np.float64(0.9995), num_clusters=np.arange(3)),
        "args": argparse.Namespace(arch="vit_small", local_crops_scale=(0.05, 0.4), tags={"a", "b"}),
        "dtype": torch.float16,
        "salt": b"\x00\xff",
    }


# --- hostile files --------------------------------------------------------------------------------------------

SPOTS = ("top level", "state dict", "hyper-parameters", "legacy header: magic number", "legacy header: sys info")
HEADER_SPOTS = SPOTS[3:]


class RunsCode:
    """Pickles as exec(code that creates `marker`): the issue's crafted object."""

    def __init__(self, marker: Path):
        self.code = f"open({str(marker)!r}, 'w').write('ran')"

    def __reduce__(self):
        return exec, (self.code,)


def hostile_file(folder: Path, legacy: bool, protocol: int, spot: str, marker: Path) -> Path:
    """A file that creates `marker` when unpickled without restriction (payload at `spot`).

    At protocol 0 the files hold no tensor: torch.save writes one there, but no torch.load can read it back.
    """
    payload = RunsCode(marker)
    weight = torch.ones(2) if protocol else 1.0
    suffix = ".ckpt" if spot == "hyper-parameters" else ".pth"
    path = folder / f"{'legacy' if legacy else 'zip'}-p{protocol}-{spot.replace(' ', '_').replace(':', '')}{suffix}"
    if spot in HEADER_SPOTS:  # torch's legacy header: magic number, protocol version, sys info, then the body
        assert legacy, spot
        with open(path, "wb") as f:
            if spot == "legacy header: sys info":
                pickle.dump(torch.serialization.MAGIC_NUMBER, f, protocol=protocol)
                pickle.dump(torch.serialization.PROTOCOL_VERSION, f, protocol=protocol)
            pickle.dump({"a": payload}, f, protocol=protocol)
        return path
    obj = {
        "top level": payload,
        "state dict": OrderedDict([("cls_token", weight), ("blocks.0.extra", {"nested": [payload]})]),
        "hyper-parameters": {"state_dict": OrderedDict(cls_token=weight), "hyper_parameters": {"callback": payload}},
    }[spot]
    torch.save(obj, path, pickle_protocol=protocol, _use_new_zipfile_serialization=not legacy)
    return path
