"""Reading and writing PyTorch weight files as flat ``{name: np.ndarray}`` dicts.

torch is imported lazily, only here, so the rest of neco_jax runs without it. ``.safetensors``
files need no torch at all. Pickled files (``.pth``, ``.pt``, ``.ckpt``, ``.bin``) are loaded with
``weights_only=True``; when a training checkpoint also pickled other Python objects (Lightning's
hyper-parameters, say), it is read again with an unpickler that admits only torch's tensor
machinery and turns every other object into an inert placeholder, so no foreign code runs and
neither Lightning nor the original repository needs to be installed.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import types
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from neco_jax.errors import UserError

PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
HEAD_PREFIX = "projection_head."
# Prefixes of the two ViTs in a NeCo Lightning checkpoint, and what they are called here.
NECO_PREFIXES = {"model.": "student", "teacher.": "teacher"}


class CheckpointReadError(UserError):
    """A weight file that is missing, truncated, or not a checkpoint at all."""


def _import_torch():
    try:
        import torch
    except ImportError:
        raise UserError(
            "reading or writing .pth/.pt/.ckpt files needs PyTorch: pip install 'neco-jax[torch]' "
            "-c constraints.txt (or convert the file to .safetensors elsewhere)"
        ) from None
    return torch


def _tolerant_pickle_module():
    """A pickle module whose Unpickler resolves only torch's allow-listed globals."""
    from torch._weights_only_unpickler import _get_allowed_globals

    allowed = set(_get_allowed_globals())

    class Placeholder(dict):
        """Stands in for a pickled object that is not a tensor; keeps nothing, runs nothing."""

        def __init__(self, *args, **kwargs):
            super().__init__()

        def __setstate__(self, state):
            pass

        def append(self, item):
            pass

        def extend(self, items):
            pass

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if f"{module}.{name}" in allowed:
                return super().find_class(module, name)
            return type(name, (Placeholder,), {})

    module = types.ModuleType("neco_jax_tolerant_pickle")
    module.Unpickler = Unpickler
    module.load = pickle.load
    module.Pickler = pickle.Pickler
    return module


def _torch_load(path: Path):
    torch = _import_torch()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):
            raise
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_tolerant_pickle_module())


def _to_numpy(name: str, value, path: Path) -> np.ndarray:
    torch = _import_torch()
    if not isinstance(value, torch.Tensor):
        raise CheckpointReadError(
            f"{path}: entry {name!r} of the state dict is a {type(value).__name__}, not a tensor; "
            "pass a file whose state dict holds only tensors"
        )
    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:  # NumPy has no bfloat16; float32 holds it exactly
        value = value.float()
    return value.numpy()


def _find_state_dict(obj, path: Path) -> Mapping:
    """The tensor mapping inside a loaded file: the file itself, or Lightning's ``state_dict``."""
    if not isinstance(obj, Mapping):
        raise CheckpointReadError(
            f"{path} holds a {type(obj).__name__}, not a state dict; save model.state_dict() instead"
        )
    for container in ("state_dict", "model"):
        inner = obj.get(container)
        if isinstance(inner, Mapping) and any(str(k).endswith("cls_token") for k in inner):
            return inner
    return obj


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a weight file, by name, as NumPy arrays (bfloat16 widened to float32)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointReadError(f"weight file {path} does not exist (or is not a file)")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        return _read_safetensors(path)
    if suffix not in PICKLE_SUFFIXES:
        raise CheckpointReadError(
            f"{path}: unknown weight file type {suffix!r}; expected one of "
            f"{', '.join(PICKLE_SUFFIXES + (SAFETENSORS_SUFFIX,))}"
        )
    try:
        loaded = _torch_load(path)
    except UserError:
        raise
    except Exception as err:  # torch raises many types for damaged files; all mean the same here
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointReadError(
            f"{path} is not a readable PyTorch checkpoint (truncated download or not a weight file?): "
            f"{reason}. Download it again or check the path."
        ) from err
    state = _find_state_dict(loaded, path)
    return {str(k): _to_numpy(str(k), v, path) for k, v in state.items()}


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        if "bf16" in str(err).lower() or "bfloat16" in str(err).lower():
            return _read_safetensors_with_torch(path)
        raise CheckpointReadError(
            f"{path} is not a readable safetensors file (truncated or another format?): {err}. "
            "Download it again or check the path."
        ) from err


def _read_safetensors_with_torch(path: Path) -> dict[str, np.ndarray]:
    _import_torch()
    from safetensors.torch import load_file

    return {k: _to_numpy(k, v, path) for k, v in load_file(str(path)).items()}


def write_state_dict(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> Path:
    """Write ``state_dict`` as .pth/.pt (torch.save) or .safetensors, atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".pth", ".pt", SAFETENSORS_SUFFIX):
        raise UserError(f"output {path}: choose a .pth, .pt or .safetensors file name")
    arrays = {k: np.ascontiguousarray(v) for k, v in state_dict.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the export the usual permissions
    try:
        if suffix == SAFETENSORS_SUFFIX:
            from safetensors.numpy import save_file

            save_file(arrays, tmp)
        else:
            torch = _import_torch()
            torch.save({k: torch.from_numpy(np.require(v, requirements="W")) for k, v in arrays.items()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def split_parts(state_dict: Mapping[str, np.ndarray]) -> tuple[dict[str, dict], dict[str, dict], list[str]]:
    """Split a checkpoint into ViT backbones and their projection heads.

    A ViT is found by its ``cls_token`` key; its prefix names it (``model.`` -> student and
    ``teacher.`` -> teacher in NeCo's Lightning checkpoints; a single ViT is the ``backbone``).
    Returns ``(backbones, heads, leftover_keys)``: backbones and heads by part name with the prefix
    removed (``projection_head.`` too, for heads), and the keys that belong to no ViT.
    """
    prefixes = sorted({k[: -len("cls_token")] for k in state_dict if k.endswith("cls_token")}, key=len)
    if not prefixes:
        raise CheckpointReadError(
            "no 'cls_token' among the keys, so this is not a ViT state dict "
            f"(first keys: {', '.join(list(state_dict)[:5]) or 'none'})"
        )
    single = len(prefixes) == 1
    backbones: dict[str, dict] = {}
    heads: dict[str, dict] = {}
    leftover = []
    for key, value in state_dict.items():
        prefix = max((p for p in prefixes if key.startswith(p)), key=len, default=None)
        if prefix is None:
            leftover.append(key)
            continue
        name = "backbone" if single else NECO_PREFIXES.get(prefix, prefix.rstrip("."))
        rest = key[len(prefix):]
        if rest.startswith(HEAD_PREFIX):
            heads.setdefault(name, {})[rest[len(HEAD_PREFIX):]] = value
        else:
            backbones.setdefault(name, {})[rest] = value
    return backbones, heads, leftover
