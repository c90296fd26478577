"""The architecture written into every export, and the check that a stated architecture fits its weights.

A state dict's shapes do not say how many attention heads a ViT has (nor its position-resampling
rule), so every weight file neco_jax writes carries the full ViTConfig as JSON under
``METADATA_KEY``: in the ``.safetensors`` header, or in a ``.pth`` state dict's ``_metadata``
(see ``torch_io.write_state_dict``), which PyTorch's ``load_state_dict(strict=True)`` ignores.
Saved folders carry it as ``config.json``. A recorded config, a folder's ``config.json`` (or any
other config that comes with weights) is used only when the weights' shapes agree with it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from neco_jax.convert import infer
from neco_jax.errors import CheckpointError, UserError

if TYPE_CHECKING:
    from neco_jax.models.vit import ViTConfig

METADATA_KEY = "neco_jax_vit_config"


def metadata_for(config: ViTConfig) -> dict[str, str]:
    """The metadata that records ``config`` in an exported weight file."""
    return {METADATA_KEY: json.dumps(config.to_dict(), sort_keys=True)}


def recorded_config(metadata: Mapping[str, str], what: str) -> ViTConfig | None:
    """The ViTConfig recorded in a weight file's metadata, or None for a file without one."""
    from neco_jax.models.vit import ViTConfig  # Flax: reading weights runs without JAX

    text = metadata.get(METADATA_KEY)
    if text is None:
        return None
    try:
        values = json.loads(text)
        if not isinstance(values, dict):
            raise ValueError(f"a JSON {type(values).__name__}, not an object")
        return ViTConfig.from_dict(values)
    except (ValueError, TypeError, UserError) as err:
        raise CheckpointError(
            f"{what}: the architecture recorded in the file ({METADATA_KEY}) is not a ViTConfig ({err}); "
            "name the architecture with --arch / arch="
        ) from err


def check_fits(config: ViTConfig, state_dict: Mapping[str, np.ndarray], what: str, fix: str) -> None:
    """Refuse ``config`` (described by ``what``) unless it has the shapes of ``state_dict`` (PyTorch layout).

    Fields are compared one by one, so the message says which ones disagree; ``has_mask_token``
    follows the file. A state dict whose shapes cannot be read is left to the strict key check
    that follows every conversion, which lists what is wrong with it.
    """
    try:
        fields = infer.shape_fields(state_dict)
    except CheckpointError:  # shapes that determine no architecture
        return
    differ = [
        f"{k} {getattr(config, k)!r} (weights: {v!r})"
        for k, v in fields.items()
        if k not in ("mlp_ratio", "has_mask_token") and getattr(config, k) != v
    ]
    weights_mlp = dataclasses.replace(config, mlp_ratio=fields["mlp_ratio"])
    if not differ and config.mlp_hidden_dim != weights_mlp.mlp_hidden_dim:
        differ.append(f"mlp_ratio {config.mlp_ratio!r} (weights: {fields['mlp_ratio']!r})")
    if differ:
        raise CheckpointError(f"{what} disagrees with the weights: {', '.join(differ)}. {fix}")
