"""Whole PyTorch weight files: every ViT a file holds (a backbone, or a NeCo training checkpoint's student and
teacher with their projection heads) read into NNX parameters, and a backbone written back as a file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from neco_jax.convert import arch_record, keymap, torch_io
from neco_jax.convert.backbone import backbone_to_jax, export_state_dict
from neco_jax.convert.head import head_config_for, head_to_jax
from neco_jax.convert.params import HeadConfig
from neco_jax.errors import CheckpointError, UserError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from neco_jax.models.vit import ViTConfig


@dataclass(frozen=True)
class Converted:
    """One ViT of a checkpoint in JAX form: its config, NNX parameters, and projection head if any."""

    config: ViTConfig
    params: dict[str, np.ndarray]
    head_config: HeadConfig | None = None
    head_params: dict[str, np.ndarray] | None = None


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


def export_file(config: ViTConfig, params: Mapping[str, np.ndarray], layout: str, path: str | Path) -> Path:
    """Write a backbone as a PyTorch file in ``layout``, with its architecture recorded (``arch_record``)."""
    return torch_io.write_state_dict(export_state_dict(params, layout), path, arch_record.metadata_for(config))
