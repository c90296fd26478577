"""A ViT backbone's state dict (DINOv2 hub or timm layout) to NNX parameters and back, with its architecture:
named, recorded in the file, or inferred from the shapes."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from neco_jax.convert import arch_record, infer, keymap
from neco_jax.convert.params import param_shapes

if TYPE_CHECKING:
    from neco_jax.models.vit import ViTConfig


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


def export_state_dict(params: Mapping[str, np.ndarray], layout: str) -> dict[str, np.ndarray]:
    """NNX backbone parameters -> PyTorch state dict in the ``dinov2`` or ``timm`` layout."""
    return keymap.to_torch({p: np.asarray(v) for p, v in params.items()}, layout)
