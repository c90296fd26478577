"""NeCo's projection head in PyTorch's keys: its widths read off the weights, and its parameters both ways."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from neco_jax.convert import keymap
from neco_jax.convert.params import HeadConfig, param_shapes
from neco_jax.errors import UserError


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
