"""Load and save ViT backbones: one entry point for names, PyTorch files, URLs and saved folders.

A saved folder holds ``config.json`` (the ViTConfig dict) and ``params.safetensors`` (every
``nnx.Param`` under its '/'-joined NNX path), plus ``head.json`` / ``head.safetensors`` when a
NeCo projection head came with the weights. A NeCo training checkpoint converts to one such
folder per ViT: ``FOLDER/student`` and ``FOLDER/teacher``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors.numpy import save_file

from neco_jax import pretrained
from neco_jax.convert import arch_record, hf, keymap, torch_io
from neco_jax.convert.backbone import resolve_arch
from neco_jax.convert.head import head_config_for, head_to_torch
from neco_jax.convert.params import HeadConfig, abstract_module, flat_params, join_path, param_shapes
from neco_jax.convert.weight_files import Converted, read_checkpoint
from neco_jax.errors import UserError
from neco_jax.files import atomic_write

if TYPE_CHECKING:
    from neco_jax.models.head import ProjectionHead
    from neco_jax.models.vit import VisionTransformer, ViTConfig

CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"
HEAD_CONFIG_FILE = "head.json"
HEAD_PARAMS_FILE = "head.safetensors"
PARTS = ("student", "teacher")


def load_backbone(
    source: str | os.PathLike,
    *,
    arch: str | ViTConfig | None = None,
    which: str = "student",
) -> VisionTransformer:
    """The NNX ViT for ``source`` (see :func:`load_converted`), ready to call."""
    converted = load_converted(source, arch=arch, which=which)
    return build(converted.config, converted.params)


def load_head(source: str | os.PathLike, *, which: str = "student") -> ProjectionHead:
    """The NeCo projection head stored with ``source`` (a NeCo checkpoint or a saved folder)."""
    converted = load_converted(source, which=which)
    if converted.head_config is None:
        raise UserError(f"{source} holds no projection head (only training checkpoints and NeCo files have one)")
    return build(converted.head_config, converted.head_params)


def load_converted(
    source: str | os.PathLike,
    *,
    arch: str | ViTConfig | None = None,
    which: str = "student",
) -> Converted:
    """Config and NumPy parameters of one ViT, from any source ``load_backbone`` accepts.

    ``source``: a known pretrained name (``neco_jax.pretrained.PRETRAINED``), an http(s)/file URL,
    a .pth/.pt/.ckpt/.safetensors file, a folder written by :func:`save_backbone`, or a Hugging Face
    transformers DINOv2 folder (``neco_jax.convert.hf``).
    ``arch``: an architecture name or ViTConfig; inferred from the weights when omitted.
    ``which``: ``student`` or ``teacher``, for NeCo training checkpoints that hold both.
    """
    path = Path(os.fspath(source))
    if hf.is_hf_folder(path):
        return hf.read_folder(path, arch)
    if path.is_dir():
        return _read_folder(_pick_folder(path, which), arch)
    path, arch = locate(source, arch)
    return _pick_part(read_checkpoint(path, arch), which, os.fspath(source))


def load_parts(source: str | os.PathLike, *, arch: str | ViTConfig | None = None) -> dict[str, Converted]:
    """Every ViT ``source`` holds, heads attached: ``{"student", "teacher"}`` for a NeCo training checkpoint
    (or its converted folder), a single entry for anything else."""
    path = Path(os.fspath(source))
    if path.is_dir():
        parts = [p for p in PARTS if (path / p / CONFIG_FILE).is_file()]
        if parts and not (path / CONFIG_FILE).is_file():
            return {p: load_converted(path, arch=arch, which=p) for p in parts}
        return {"backbone": load_converted(path, arch=arch)}
    return read_checkpoint(*locate(source, arch))


def locate(source: str | os.PathLike, arch: str | ViTConfig | None = None) -> tuple[Path, Any]:
    """The local weight file for a file path, URL or known name (downloaded once into the cache),
    and the architecture to read it with (a known name brings its own unless ``arch`` is given)."""
    text = os.fspath(source)
    path = Path(text)
    if path.is_file():
        return path, arch
    if "://" in text:
        return pretrained.fetch(text), arch
    if path.suffix or os.sep in text:
        raise UserError(f"{text} does not exist: give an existing weight file, a URL or a known pretrained name")
    entry = pretrained.get_pretrained(text)  # an unknown name raises, listing the known ones
    arch = arch if arch is not None else resolve_arch(entry.arch, **entry.overrides)
    return pretrained.fetch(text), arch


def _pick_part(parts: Mapping[str, Converted], which: str, source: str) -> Converted:
    if len(parts) == 1:
        return next(iter(parts.values()))
    if which not in parts:
        raise UserError(f"{source} holds the ViTs {sorted(parts)}; choose one with which=")
    return parts[which]


def _pick_folder(folder: Path, which: str) -> Path:
    if (folder / CONFIG_FILE).is_file():
        return folder
    if (folder / which / CONFIG_FILE).is_file():
        return folder / which
    raise UserError(
        f"{folder} is not a saved backbone: it has no {CONFIG_FILE} (nor {which}/{CONFIG_FILE}); "
        "write one with neco_jax.save_backbone or `python -m neco_jax.convert to-jax`"
    )


def _read_params(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise UserError(f"{path} is missing; save the backbone again")
    return torch_io.read_safetensors(path, "Save the backbone again.")[0]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{path} is not readable JSON ({err}); save the backbone again") from err
    if not isinstance(values, dict):
        raise UserError(f"{path} holds a JSON {type(values).__name__}, not an object; save the backbone again")
    return values


def _read_folder(folder: Path, arch: str | ViTConfig | None) -> Converted:
    from neco_jax.models.vit import ViTConfig  # Flax: reading a folder runs without JAX

    values = _read_json(folder / CONFIG_FILE)
    try:
        saved = ViTConfig.from_dict(values)
    except (TypeError, UserError) as err:
        raise UserError(f"{folder / CONFIG_FILE} is not a ViTConfig ({err}); save the backbone again") from err
    params = _read_params(folder / PARAMS_FILE)
    if arch is None:
        arch_record.check_fits(
            saved,
            keymap.to_torch(params, "dinov2"),
            str(folder / CONFIG_FILE),
            f"It does not describe {PARAMS_FILE}: save the backbone again, or pass arch=.",
        )
    config = resolve_arch(arch) if arch is not None else saved
    _check_params(params, param_shapes(config), f"{folder / PARAMS_FILE}")
    head_config = head_params = None
    if (folder / HEAD_CONFIG_FILE).is_file():
        head_config = HeadConfig.from_dict(_read_json(folder / HEAD_CONFIG_FILE), str(folder / HEAD_CONFIG_FILE))
        head_params = _read_params(folder / HEAD_PARAMS_FILE)
        _check_params(head_params, param_shapes(head_config), f"{folder / HEAD_PARAMS_FILE}")
    return Converted(config, params, head_config, head_params)


def _check_params(params: Mapping[str, np.ndarray], shapes: Mapping[str, tuple], what: str) -> None:
    keymap.check_keys(params, shapes, what, "The folder was saved for another architecture.")


def build(config: ViTConfig | HeadConfig, params: Mapping[str, np.ndarray]) -> VisionTransformer | ProjectionHead:
    """The VisionTransformer (or ProjectionHead) for ``config`` holding exactly ``params``.

    Nothing is randomly initialised: the module is traced abstractly and every parameter is filled.
    """
    import jax.numpy as jnp  # JAX/Flax only when a model is built (the converter reads files without them)
    from flax import nnx

    keymap.check_keys(params, param_shapes(config), "the parameters", "They were made for another architecture.")
    graphdef, abstract, rest = abstract_module(config)
    filled = [(path, var.replace(jnp.asarray(params[join_path(path)]))) for path, var in nnx.to_flat_state(abstract)]
    return nnx.merge(graphdef, nnx.from_flat_state(filled), rest)


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def _write_arrays(path: Path, arrays: Mapping[str, Any]) -> None:
    contiguous = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()}
    atomic_write(path, lambda tmp: save_file(contiguous, tmp))


def save_converted(converted: Converted, folder: str | os.PathLike) -> Path:
    """Write a converted ViT (and its head, if any) as a backbone folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_arrays(folder / PARAMS_FILE, converted.params)
    _write_json(folder / CONFIG_FILE, converted.config.to_dict())
    for name in (HEAD_CONFIG_FILE, HEAD_PARAMS_FILE):
        (folder / name).unlink(missing_ok=True)
    if converted.head_config is not None:
        _write_arrays(folder / HEAD_PARAMS_FILE, converted.head_params)
        _write_json(folder / HEAD_CONFIG_FILE, converted.head_config.to_dict())
    return folder


def save_backbone(model: VisionTransformer, folder: str | os.PathLike, *, head: ProjectionHead | None = None) -> Path:
    """Save ``model`` (and optionally its projection head) so that ``load_backbone(folder)`` rebuilds it."""
    head_config = head_params = None
    if head is not None:
        head_params = {p: np.asarray(v) for p, v in flat_params(head).items()}
        head_config = head_config_for(head_to_torch(head_params), "the projection head")
    params = {p: np.asarray(v) for p, v in flat_params(model).items()}
    return save_converted(Converted(model.config, params, head_config, head_params), folder)
