"""The NNX parameters that conversion fills: the abstract ViT or projection head of a config, its parameter
shapes, and parameter trees as flat '/'-joined paths (the layout of saved folders and of `nnx.to_pure_dict`).

Reading weights runs without JAX: Flax and the models load inside the functions that build a model.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from neco_jax.errors import UserError

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
