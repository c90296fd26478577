"""Weight conversion between PyTorch ViT checkpoints and neco_jax's NNX models.

Into JAX: DINOv2 hub and timm state dicts, NeCo's released files and its Lightning training
checkpoints (student, teacher and both projection heads), as .pth/.pt/.ckpt/.safetensors.
Out of JAX: the DINOv2 hub layout or timm's, as .pth or .safetensors. Hugging Face transformers
folders go both ways (``hf.py``).
The CLI is ``python -m neco_jax.convert`` (see ``__main__.py``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from neco_jax.convert import arch_record, infer, keymap, torch_io
from neco_jax.errors import CheckpointError, UserError

if TYPE_CHECKING:
    from neco_jax.models.vit import ViTConfig


@dataclass(frozen=True)
class HeadConfig:
    """Shape of a NeCo projection head (D -> hidden -> ... -> out), read from its weights."""

    in_dim: int
    hidden_dim: int
    out_dim: int
    num_layers: int

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], what: str) -> HeadConfig:
        """The head config saved as ``values`` (read from ``what``); wrong or missing fields are refused."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown, missing = sorted(set(values) - set(known)), [k for k in known if k not in values]
        bad = [k for k in known if k in values and (type(values[k]) is not int or values[k] <= 0)]
        if unknown or missing or bad:
            problems = [
                f"{name} field(s) {keys}"
                for name, keys in (("unknown", unknown), ("missing", missing), ("non-positive or non-integer", bad))
                if keys
            ]
            raise UserError(
                f"{what} is not a projection head config: {'; '.join(problems)} (fields: {known}); "
                "save the backbone again"
            )
        return cls(**values)


@dataclass(frozen=True)
class Converted:
    """One ViT of a checkpoint in JAX form: its config, NNX parameters, and projection head if any."""

    config: ViTConfig
    params: dict[str, np.ndarray]
    head_config: HeadConfig | None = None
    head_params: dict[str, np.ndarray] | None = None


def resolve_arch(arch: str | ViTConfig, **overrides: Any) -> ViTConfig:
    """A ViTConfig from a name (``neco_jax.models.get_arch``) or an existing config."""
    from neco_jax.models import get_arch  # Flax: reading weights runs without JAX

    if isinstance(arch, str):
        return get_arch(arch, **overrides)
    return dataclasses.replace(arch, **overrides) if overrides else arch


def config_for(
    state_dict: Mapping[str, np.ndarray],
    arch: str | ViTConfig | None = None,
    recorded: ViTConfig | None = None,
    what: str = "the state dict",
) -> ViTConfig:
    """The architecture of a backbone state dict: ``arch`` if given, else the one ``recorded`` in its
    file (checked against the shapes), else inferred from the shapes (DINO/DINOv2 widths only).

    ``has_mask_token`` always follows the file: DINOv2 hub files carry ``mask_token`` (kept, so an
    export is complete), timm files have none; it takes no part in the forward pass.
    """
    has_mask = "mask_token" in state_dict
    if arch is not None:
        return resolve_arch(arch, has_mask_token=has_mask)
    if recorded is not None:
        arch_record.check_fits(
            recorded,
            state_dict,
            f"{what}: the architecture recorded in the file",
            "Name the right architecture with --arch / arch=.",
        )
        return resolve_arch(recorded, has_mask_token=has_mask)
    fields = infer.infer_fields(state_dict)
    return resolve_arch(infer.family_arch_name(fields), **fields)


@functools.lru_cache(maxsize=8)
def abstract_module(config: ViTConfig | HeadConfig):
    """``nnx.split(module, nnx.Param, ...)`` of the (unallocated) ViT or head for ``config``.

    Tracing a model's construction is the slow part of loading (seconds for ViT-g), so it is done
    once per config; callers fill the abstract parameters and ``nnx.merge``.
    """
    from flax import nnx  # JAX/Flax only when a model is built: reading weights runs without them

    from neco_jax.models.head import ProjectionHead
    from neco_jax.models.vit import VisionTransformer

    if isinstance(config, HeadConfig):

        def factory():
            return ProjectionHead(
                config.in_dim,
                hidden_dim=config.hidden_dim,
                out_dim=config.out_dim,
                num_layers=config.num_layers,
                rngs=nnx.Rngs(0),
            )
    else:

        def factory():
            return VisionTransformer(config, rngs=nnx.Rngs(0))

    return nnx.split(nnx.eval_shape(factory), nnx.Param, ...)


def param_shapes(config: ViTConfig | HeadConfig) -> dict[str, tuple[int, ...]]:
    """'/'-joined NNX parameter path -> shape, for the ViT (or head) with this config."""
    from flax import nnx  # JAX/Flax: see abstract_module

    _, params, _ = abstract_module(config)
    return {join_path(path): tuple(var.get_value().shape) for path, var in nnx.to_flat_state(params)}


def join_path(path) -> str:
    """An NNX state path as the '/'-joined string used for saved parameters."""
    return "/".join(str(p) for p in path)


def flatten_params(tree: Mapping) -> dict[str, Any]:
    """'/'-joined path -> leaf of nested parameter dicts (``nnx.to_pure_dict``'s layout, list indices as ints)."""
    from flax import traverse_util  # JAX/Flax: see abstract_module

    return {join_path(path): value for path, value in traverse_util.flatten_dict(tree).items()}


def unflatten_params_like(template: Mapping, flat: Mapping[str, Any]) -> dict:
    """Nested parameter dicts shaped as ``template``, each leaf taken from ``flat`` ('/'-joined paths)."""
    from flax import traverse_util  # JAX/Flax: see abstract_module

    paths = traverse_util.flatten_dict(template)
    return traverse_util.unflatten_dict({path: flat[join_path(path)] for path in paths})


def flat_params(module) -> dict[str, Any]:
    """'/'-joined path -> value of every ``nnx.Param`` of a module."""
    from flax import nnx  # JAX/Flax: see abstract_module

    return flatten_params(nnx.to_pure_dict(nnx.state(module, nnx.Param)))


def _head_torch_keys(jax_paths) -> dict[str, str]:
    """NNX head path -> key in NeCo's ``projection_head`` (an nn.Sequential of Linear/GELU, or one Linear)."""
    kernels = sorted((p for p in jax_paths if p.endswith("kernel")), key=keymap.natural_key)
    if len(kernels) == 1:
        prefixes = {kernels[0][: -len("kernel")]: ""}
    else:
        prefixes = {k[: -len("kernel")]: f"{2 * i}." for i, k in enumerate(kernels)}
    out = {}
    for path in jax_paths:
        prefix = path[: path.rindex("/") + 1]
        leaf = "weight" if path.endswith("kernel") else "bias"
        out[path] = prefixes[prefix] + leaf
    return out


def head_config_for(state_dict: Mapping[str, np.ndarray], what: str) -> HeadConfig:
    """Read a projection head's widths and depth off its PyTorch weights."""
    weights = sorted((k for k in state_dict if k.endswith("weight")), key=keymap.natural_key)
    if not weights or any(state_dict[k].ndim != 2 for k in weights):
        raise UserError(f"{what}: projection_head keys {sorted(state_dict)} are not a stack of Linear layers")
    first, last = state_dict[weights[0]].shape, state_dict[weights[-1]].shape
    # A one-layer head has no hidden width; the field then keeps ProjectionHead's default.
    return HeadConfig(
        in_dim=first[1], hidden_dim=first[0] if len(weights) > 1 else 2048, out_dim=last[0], num_layers=len(weights)
    )


def head_to_jax(state_dict: Mapping[str, np.ndarray], config: HeadConfig, what: str) -> dict[str, np.ndarray]:
    """NeCo ``projection_head.*`` weights (prefix removed) -> NNX head parameters, strictly."""
    shapes = param_shapes(config)
    keys = _head_torch_keys(shapes)
    expected = {keys[p]: (s[::-1] if p.endswith("kernel") else s) for p, s in shapes.items()}
    keymap.check_keys(state_dict, expected, f"{what} (projection head)", "The head is not NeCo's D->hidden->out MLP.")
    return {
        p: np.ascontiguousarray(state_dict[keys[p]].T if p.endswith("kernel") else state_dict[keys[p]]) for p in shapes
    }


def head_to_torch(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """NNX head parameters -> NeCo ``projection_head`` keys (without the prefix)."""
    keys = _head_torch_keys(params)
    return {keys[p]: (np.asarray(v).T if p.endswith("kernel") else np.asarray(v)) for p, v in params.items()}


def backbone_to_jax(
    state_dict: Mapping[str, np.ndarray],
    arch: str | ViTConfig | None = None,
    *,
    what: str = "the state dict",
    recorded: ViTConfig | None = None,
) -> tuple[ViTConfig, dict[str, np.ndarray]]:
    """A backbone state dict (DINOv2 or timm layout) -> (config, float32 NNX parameters).

    ``recorded``: the architecture written into the file (``arch_record``), used when ``arch`` is None.
    """
    state_dict = keymap.normalize_keys(state_dict)
    config = config_for(state_dict, arch, recorded, what)
    hint = (
        "Name the right architecture with --arch / arch=, or drop it to infer one from the shapes."
        if arch is not None
        else "Name the architecture with --arch / arch=."
    )
    params = keymap.to_jax(state_dict, param_shapes(config), keymap.detect_layout(state_dict), what=what, hint=hint)
    return config, {p: v.astype(np.float32, copy=False) for p, v in params.items()}


def read_checkpoint(path: str | Path, arch: str | ViTConfig | None = None) -> dict[str, Converted]:
    """Every ViT in a weight file, converted: ``{"backbone": ...}`` for a plain state dict,
    ``{"student": ..., "teacher": ...}`` for a NeCo Lightning checkpoint; heads attached."""
    state_dict, metadata = torch_io.read_weights(path)
    recorded = arch_record.recorded_config(metadata, str(path))
    backbones, heads, leftover = torch_io.split_parts(state_dict)
    if leftover:
        raise CheckpointError(
            keymap.mismatch_message(
                str(path), [], sorted(leftover), [], "These keys belong to no ViT (no matching cls_token prefix)."
            )
        )
    out = {}
    for name, sd in backbones.items():
        what = str(path) if name == "backbone" else f"{path} [{name}]"
        config, params = backbone_to_jax(sd, arch, what=what, recorded=recorded)
        head_config = head_params = None
        if name in heads:
            head_config = head_config_for(heads[name], what)
            head_params = head_to_jax(heads[name], head_config, what)
        out[name] = Converted(config, params, head_config, head_params)
    orphans = sorted(heads.keys() - backbones.keys())
    if orphans:
        raise UserError(f"{path}: projection head(s) under {orphans} have no backbone beside them")
    return out


def export_state_dict(params: Mapping[str, np.ndarray], layout: str) -> dict[str, np.ndarray]:
    """NNX backbone parameters -> PyTorch state dict in the ``dinov2`` or ``timm`` layout."""
    return keymap.to_torch({p: np.asarray(v) for p, v in params.items()}, layout)


def export_file(config: ViTConfig, params: Mapping[str, np.ndarray], layout: str, path: str | Path) -> Path:
    """Write a backbone as a PyTorch file in ``layout``, with its architecture recorded (``arch_record``)."""
    return torch_io.write_state_dict(export_state_dict(params, layout), path, arch_record.metadata_for(config))
