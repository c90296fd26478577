"""Key maps between PyTorch ViT state dicts (DINOv2 hub or timm layout) and the NNX parameter tree.

Everything here is NumPy: a transpose or a rename per parameter, so the round trip
PyTorch -> JAX -> PyTorch is bit-exact. The expected PyTorch keys and shapes are derived by
running the export on zero-stride views of the model's own parameter shapes, so the two directions
can never disagree about a key.

Layouts:
- ``dinov2``: facebookresearch/dinov2 hub (and NeCo) names. ``mask_token`` and ``register_tokens``
  kept, SwiGLU as ``mlp.w12`` / ``mlp.w3``.
- ``timm``: timm's ViT names. No ``mask_token``; registers are ``reg_token``; with registers, timm
  keeps no position for the class token, so ``cls_token`` holds ``cls_token + pos_embed[:, 0]`` and
  ``pos_embed`` only the patch grid; SwiGLU as ``mlp.fc1`` / ``mlp.fc2``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

import numpy as np

from neco_jax.errors import CheckpointError, UserError

Layout = Literal["dinov2", "timm"]
LAYOUTS: tuple[str, ...] = ("dinov2", "timm")

_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")
_SHOWN = 12  # keys listed per category in a mismatch message


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")


def _torch_key(path: str, layout: str, swiglu: bool) -> str | None:
    """PyTorch name of one NNX parameter path, or None where the layout has no place for it."""
    if path == "mask_token":
        return "mask_token" if layout == "dinov2" else None
    if path == "register_tokens":
        return "register_tokens" if layout == "dinov2" else "reg_token"
    parts = path.split("/")
    leaf = {"kernel": "weight", "scale": "weight"}.get(parts[-1], parts[-1])
    if swiglu and layout == "timm" and len(parts) >= 3 and parts[-3] == "mlp":
        parts[-2] = {"w12": "fc1", "w3": "fc2"}.get(parts[-2], parts[-2])
    return ".".join(parts[:-1] + [leaf])


def _to_torch_array(value: np.ndarray, path: str) -> np.ndarray:
    if path.endswith("/kernel"):
        if value.ndim == 4:  # conv (kh, kw, in, out) -> (out, in, kh, kw)
            return value.transpose(3, 2, 0, 1)
        return value.T  # linear (in, out) -> (out, in)
    return value


def _to_jax_array(value: np.ndarray, path: str) -> np.ndarray:
    if path.endswith("/kernel"):
        if value.ndim == 4:  # conv (out, in, kh, kw) -> (kh, kw, in, out)
            return value.transpose(2, 3, 1, 0)
        return value.T
    return value


def _is_swiglu(paths) -> bool:
    return any("/mlp/w12/" in p for p in paths)


def _folds_class_position(paths, layout: str) -> bool:
    return layout == "timm" and "register_tokens" in paths


def to_torch(params: Mapping[str, np.ndarray], layout: Layout) -> dict[str, np.ndarray]:
    """NNX parameters ('/'-joined paths) -> PyTorch state dict (NumPy values) in ``layout``."""
    _check_layout(layout)
    swiglu = _is_swiglu(params)
    out: dict[str, np.ndarray] = {}
    for path, value in params.items():
        key = _torch_key(path, layout, swiglu)
        if key is not None:
            out[key] = _to_torch_array(np.asarray(value), path)
    if _folds_class_position(params, layout):
        pos = np.asarray(params["pos_embed"])
        out["cls_token"] = np.asarray(params["cls_token"]) + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    return out


def dropped_paths(params: Mapping[str, object], layout: Layout) -> list[str]:
    """NNX paths that ``layout`` has no place for (``mask_token`` in timm's), left out by ``to_torch``."""
    swiglu = _is_swiglu(params)
    return sorted(p for p in params if _torch_key(p, layout, swiglu) is None)


def expected_torch_shapes(jax_shapes: Mapping[str, tuple[int, ...]], layout: Layout) -> dict[str, tuple]:
    """PyTorch key -> shape that a model with these NNX parameter shapes has in ``layout``."""
    views = {p: np.broadcast_to(np.zeros((), np.float32), s) for p, s in jax_shapes.items()}
    return {k: tuple(v.shape) for k, v in to_torch(views, layout).items()}


def normalize_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Undo DINOv2's FSDP block chunking (``blocks.{chunk}.{i}.`` -> ``blocks.{i}.``)."""
    return {_CHUNKED_BLOCK.sub(r"blocks.\1.", k): v for k, v in state_dict.items()}


def detect_layout(state_dict: Mapping[str, np.ndarray]) -> Layout:
    """``timm`` when the keys say so (``reg_token`` or SwiGLU as fc1/fc2), else ``dinov2``.

    Without registers or SwiGLU the two layouts differ only in ``mask_token``, whose presence is
    carried by the architecture (``has_mask_token``), so ``dinov2`` is right for both.
    """
    if "reg_token" in state_dict:
        return "timm"
    fc1, fc2 = state_dict.get("blocks.0.mlp.fc1.weight"), state_dict.get("blocks.0.mlp.fc2.weight")
    if fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]:
        return "timm"
    return "dinov2"


def natural_key(key: str) -> list:
    """Sort key that puts blocks.2 before blocks.10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def mismatch_message(
    what: str,
    missing: list[str],
    unexpected: list[str],
    mismatched: list[str],
    hint: str,
) -> str:
    """One message listing every category of disagreement (first keys of each)."""

    def _list(name: str, keys: list[str]) -> str:
        keys = sorted(keys, key=natural_key)
        more = f" ... (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
        return f"{name} ({len(keys)}): {', '.join(keys[:_SHOWN])}{more}"

    parts = [
        _list(n, k) for n, k in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if k
    ]
    return f"{what} does not fit the architecture: " + "; ".join(parts) + f". {hint}"


def check_keys(state: Mapping[str, np.ndarray], expected: Mapping[str, tuple], what: str, hint: str) -> None:
    """Raise one CheckpointError unless ``state`` has exactly the ``expected`` keys and shapes."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k])}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k])
    ]
    if missing or unexpected or mismatched:
        raise CheckpointError(mismatch_message(what, missing, unexpected, mismatched, hint))


def to_jax(
    state_dict: Mapping[str, np.ndarray],
    jax_shapes: Mapping[str, tuple[int, ...]],
    layout: Layout,
    *,
    what: str = "the state dict",
    hint: str = "Check the architecture (--arch) or the file.",
) -> dict[str, np.ndarray]:
    """PyTorch state dict -> NNX parameters, strict: every key used, every parameter filled.

    ``jax_shapes`` is the target model's parameter tree (path -> shape). Any missing, unexpected or
    wrongly shaped key raises one :class:`CheckpointError` that lists all of them.
    """
    _check_layout(layout)
    check_keys(state_dict, expected_torch_shapes(jax_shapes, layout), what, hint)

    source = dict(state_dict)
    if _folds_class_position(jax_shapes, layout):
        # cls_token already holds cls + pos[:, 0]; a zero class position keeps the sum exact.
        pos = source["pos_embed"]
        source["pos_embed"] = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
    swiglu = _is_swiglu(jax_shapes)
    params = {}
    for path in jax_shapes:
        key = _torch_key(path, layout, swiglu)
        if key is None:
            # No place in this layout (mask_token from timm): the architecture must not have it.
            raise CheckpointError(f"{what}: the {layout} layout has no {path!r} but the architecture needs one. {hint}")
        params[path] = np.ascontiguousarray(_to_jax_array(np.asarray(source[key]), path))
    return params
