"""Reading and writing PyTorch weight files as flat ``{name: np.ndarray}`` dicts.

torch is imported lazily, only here, so the rest of neco_jax runs without it. ``.safetensors``
files need no torch at all. Pickled files (``.pth``, ``.pt``, ``.ckpt``, ``.bin``: torch's zip and
legacy formats, Lightning checkpoints) are read by ``torch.load`` with ``safe_pickle`` as its pickle
module, so every object a file names must be on that module's one allow-list (tensors, plain
containers, numbers, hyper-parameter containers rebuilt as dicts); any other name refuses the file
before anything in it is built, and neither Lightning nor the original repository needs to be installed.
"""

from __future__ import annotations

import collections
import os
import tarfile
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 / float8 with NumPy)
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from neco_jax.convert import safe_pickle
from neco_jax.errors import CheckpointError, UserError
from neco_jax.files import atomic_write

PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
# Pseudo module name under which a .pth state dict's ``_metadata`` carries neco_jax's metadata:
# load_state_dict looks up ``_metadata`` by module prefix only, so a strict load ignores it.
METADATA_MODULE = "neco_jax"
HEAD_PREFIX = "projection_head."
# Prefixes of the two ViTs in a NeCo Lightning checkpoint, and what they are called here.
NECO_PREFIXES = {"model.": "student", "teacher.": "teacher"}


def _import_torch():
    try:
        import torch  # the optional torch extra, and a slow import: only for .pth/.pt/.ckpt files
    except ImportError:
        raise UserError(
            "reading or writing .pth/.pt/.ckpt files needs PyTorch: pip install 'neco-jax[torch]' "
            "-c constraints.txt (or convert the file to .safetensors elsewhere)"
        ) from None
    return torch


def _refuse_archives(path: Path) -> None:
    """Refuse the two kinds of file that torch.load reads other than by unpickling: a TorchScript archive (it
    hands that to torch.jit.load, which runs the archive's code) and PyTorch's oldest format, a tar archive
    (which it extracts to disk first). Both are detected the way torch.load detects them."""
    from torch import serialization  # torch: see _import_torch

    with open(path, "rb") as f:
        if serialization._is_zipfile(f):
            with serialization._open_zipfile_reader(f) as archive:
                if serialization._is_torchscript_zip(archive):
                    raise CheckpointError(
                        f"{path} is a TorchScript archive (a program, not a state dict); loading it would run "
                        "its code, so it is not read. Save the model's state_dict() with torch.save instead"
                    )
            return
        try:
            tarfile.open(fileobj=f, mode="r:").close()
        except tarfile.TarError:
            return
    raise CheckpointError(
        f"{path} is in PyTorch's oldest format (a tar archive, which torch.load extracts to disk), which neco_jax "
        "does not read; load it in PyTorch and save its state_dict() with torch.save"
    )


def load_pickled(path: str | os.PathLike):
    """The object a pickled PyTorch file holds, read through ``safe_pickle``'s allow-list only.

    Every way that fails is a ``CheckpointError``: a name off the allow-list (naming it), a TorchScript or
    tar archive, or a file torch cannot read at all.
    """
    path = Path(path)
    torch = _import_torch()
    try:
        _refuse_archives(path)
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=safe_pickle)
    except UserError:
        raise
    except safe_pickle.RefusedGlobal as err:
        raise CheckpointError(
            f"{path} names the Python object {err.name}, which is not on neco_jax's allow-list of what a weight "
            "file may hold (tensors, containers, numbers); building it could run code from the file, so nothing "
            "in the file is read. If you trust its source, load it with torch.load(weights_only=False) and save "
            "model.state_dict() (tensors only) with torch.save"
        ) from None
    except Exception as err:  # torch raises many types for damaged files; all mean the same here
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated download or not a weight file?): "
            f"{reason}. Download it again or check the path."
        ) from err


def _to_numpy(name: str, value, path: Path) -> np.ndarray:
    torch = _import_torch()
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(
            f"{path}: entry {name!r} of the state dict is a {type(value).__name__}, not a tensor; "
            "pass a file whose state dict holds only tensors"
        )
    value = value.detach().cpu()
    if value.dtype not in (torch.float16, torch.float32, torch.float64) and value.is_floating_point():
        value = value.float()  # NumPy has no bfloat16 or float8; float32 holds them exactly
    return value.numpy()


def _find_state_dict(obj, path: Path) -> Mapping:
    """The tensor mapping inside a loaded file: the file itself, or Lightning's ``state_dict``."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict; save model.state_dict() instead")
    for container in ("state_dict", "model"):
        inner = obj.get(container)
        if isinstance(inner, Mapping) and any(str(k).endswith("cls_token") for k in inner):
            return inner
    return obj


def _refuse_non_float(path: Path, bad: Mapping[str, str]) -> None:
    """Weights are floating point; anything else would be cast to float32 silently, so it is refused by key."""
    bad = [f"{k!r} ({d})" for k, d in bad.items()]
    if bad:
        shown = ", ".join(bad[:8]) + (f" ... (+{len(bad) - 8} more)" if len(bad) > 8 else "")
        raise CheckpointError(
            f"{path} holds tensors that are not floating point: {shown}; a ViT's weights are floating point and "
            "these would change if cast to float32. Remove them from the file (save only the model's weights)"
        )


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a weight file, by name, as NumPy arrays (bfloat16 widened to float32)."""
    return read_weights(path)[0]


def read_weights(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors of a weight file (see :func:`read_state_dict`) and the metadata written with them.

    Metadata is the string map of a ``.safetensors`` header, or of a ``.pth`` state dict's
    ``_metadata[METADATA_MODULE]`` (see :func:`write_state_dict`); empty when the file has none.
    Tensors that are not floating point (integer, bool, complex) are refused by key.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weight file {path} does not exist (or is not a file)")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        return read_safetensors(path, "Download it again or check the path.")
    if suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: unknown weight file type {suffix!r}; expected one of "
            f"{', '.join(PICKLE_SUFFIXES + (SAFETENSORS_SUFFIX,))}"
        )
    state = _find_state_dict(load_pickled(path), path)
    torch = _import_torch()
    _refuse_non_float(
        path,
        {
            str(k): str(v.dtype).removeprefix("torch.")
            for k, v in state.items()
            if isinstance(v, torch.Tensor) and (v.is_complex() or not v.is_floating_point())
        },
    )
    metadata = getattr(state, "_metadata", None)
    metadata = metadata.get(METADATA_MODULE) if isinstance(metadata, Mapping) else None
    metadata = {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, Mapping) else {}
    return {str(k): _to_numpy(str(k), v, path) for k, v in state.items()}, metadata


def read_safetensors(path: Path, fix: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors (bfloat16 and float8 widened to float32) and header metadata of a ``.safetensors`` file.

    ``fix`` ends the message for a damaged file. Reading needs no torch and no JAX: ml_dtypes gives
    NumPy the bfloat16 and float8 types that safetensors' NumPy reader asks for.
    """
    try:
        with safe_open(str(path), framework="np") as f:
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
            _refuse_non_float(path, {k: d for k, d in dtypes.items() if not (d.startswith("F") or d == "BF16")})
            arrays = {k: f.get_tensor(k) for k in dtypes}
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors file (truncated or another format?): {err}. {fix}"
        ) from err
    widen = {k for k, d in dtypes.items() if d not in ("F64", "F32", "F16")}
    return {k: v.astype(np.float32) if k in widen else v for k, v in arrays.items()}, metadata


def write_state_dict(
    state_dict: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``state_dict`` as .pth/.pt (torch.save) or .safetensors, atomically.

    ``metadata`` (strings) goes into the safetensors header, or into the .pth state dict's
    ``_metadata[METADATA_MODULE]``, where ``load_state_dict(strict=True)`` does not see it;
    :func:`read_weights` returns it.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".pth", ".pt", SAFETENSORS_SUFFIX):
        raise UserError(f"output {path}: choose a .pth, .pt or .safetensors file name")
    arrays = {k: np.ascontiguousarray(v) for k, v in state_dict.items()}
    metadata = dict(metadata or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == SAFETENSORS_SUFFIX:
        return atomic_write(path, lambda tmp: save_file(arrays, tmp, metadata=metadata or None))
    torch = _import_torch()
    tensors = collections.OrderedDict((k, torch.from_numpy(np.require(v, requirements="W"))) for k, v in arrays.items())
    if metadata:
        tensors._metadata = collections.OrderedDict({METADATA_MODULE: metadata})
    return atomic_write(path, lambda tmp: torch.save(tensors, tmp))


def split_parts(state_dict: Mapping[str, np.ndarray]) -> tuple[dict[str, dict], dict[str, dict], list[str]]:
    """Split a checkpoint into ViT backbones and their projection heads.

    A ViT is found by its ``cls_token`` key; its prefix names it (``model.`` -> student and
    ``teacher.`` -> teacher in NeCo's Lightning checkpoints; a single ViT is the ``backbone``).
    Returns ``(backbones, heads, leftover_keys)``: backbones and heads by part name with the prefix
    removed (``projection_head.`` too, for heads), and the keys that belong to no ViT.
    """
    prefixes = sorted({k[: -len("cls_token")] for k in state_dict if k.endswith("cls_token")}, key=len)
    if not prefixes:
        raise CheckpointError(
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
        rest = key[len(prefix) :]
        if rest.startswith(HEAD_PREFIX):
            heads.setdefault(name, {})[rest[len(HEAD_PREFIX) :]] = value
        else:
            backbones.setdefault(name, {})[rest] = value
    return backbones, heads, leftover
