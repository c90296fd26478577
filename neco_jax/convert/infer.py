"""The ViT architecture of a PyTorch state dict, read from its key names and shapes.

Everything that shapes parameters is read off the tensors (width, depth, patch size, registers,
layer scale, position grid, feed-forward kind and width). Two things are not in the shapes: the
number of heads, known only for the widths of the DINO and DINOv2 sizes (``archs.FAMILY_HEADS``),
and the non-parameter fields (position interpolation rule, drop path), taken from the family's
named architecture. A file of any other width must record its architecture (every neco_jax export
does, see ``arch_record.py``) or be read with ``arch``: a guessed head count gives wrong outputs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from neco_jax.errors import CheckpointError
from neco_jax.models.vit_config import swiglu_hidden_dim

_SIZES = {384: "small", 768: "base", 1024: "large", 1536: "giant"}
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def _shape(state_dict: Mapping[str, np.ndarray], key: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise CheckpointError(
            f"cannot infer the architecture: the state dict has no {key!r} "
            "(is this a DINO/DINOv2/timm ViT?); name it with --arch / arch="
        )
    return tuple(state_dict[key].shape)


def _square_side(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side * side == n else None


def infer_fields(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """ViTConfig field values implied by the tensors (keys in DINOv2 or timm layout), heads included."""
    from neco_jax.models.archs import FAMILY_HEADS  # Flax: reading weights runs without JAX

    fields = shape_fields(state_dict)
    dim = fields["embed_dim"]
    if dim not in FAMILY_HEADS:
        raise CheckpointError(
            f"the weights record no architecture and their width {dim} is none of the DINO/DINOv2 sizes "
            f"({', '.join(map(str, sorted(FAMILY_HEADS)))}), so their number of heads is unknown; "
            "name the architecture with --arch / arch= (a name, or a ViTConfig with num_heads), or where neither "
            "can be given (model.init of a training run), convert the file once with `python -m neco_jax.convert "
            "to-jax FILE --out FOLDER --arch NAME` and use FOLDER"
        )
    return {**fields, "num_heads": FAMILY_HEADS[dim]}


def shape_fields(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The ViTConfig fields that the tensors' shapes fix (all but the heads and the non-parameter fields)."""
    dim = _shape(state_dict, "cls_token")[-1]
    proj = _shape(state_dict, "patch_embed.proj.weight")
    if len(proj) != 4 or proj[2] != proj[3] or proj[1] != 3:
        raise CheckpointError(f"patch_embed.proj.weight has shape {proj}; expected (D, 3, p, p)")
    blocks = {int(m.group(1)) for k in state_dict if (m := _BLOCK.match(k))}
    if not blocks:
        raise CheckpointError("cannot infer the architecture: the state dict has no 'blocks.N.' keys")

    registers = 0
    for key in ("register_tokens", "reg_token"):
        if key in state_dict:
            registers = state_dict[key].shape[1]
    pos_rows = _shape(state_dict, "pos_embed")[1]
    grid = _square_side(pos_rows - 1) or _square_side(pos_rows)  # timm reg layout has no class row
    if grid is None:
        raise CheckpointError(f"pos_embed has {pos_rows} rows, which is no square grid (+1 class row)")

    fc1_key = "blocks.0.mlp.w12.weight" if "blocks.0.mlp.w12.weight" in state_dict else "blocks.0.mlp.fc1.weight"
    fc2_key = fc1_key.replace("w12", "w3").replace("fc1", "fc2")
    hidden_in, hidden_out = _shape(state_dict, fc1_key)[0], _shape(state_dict, fc2_key)[1]
    swiglu = hidden_in == 2 * hidden_out
    fields: dict[str, Any] = dict(
        patch_size=proj[2],
        embed_dim=dim,
        depth=max(blocks) + 1,
        ffn_layer="swiglu" if swiglu else "mlp",
        num_register_tokens=registers,
        layerscale="blocks.0.ls1.gamma" in state_dict,
        pos_grid=grid,
        has_mask_token="mask_token" in state_dict,
    )
    fields["mlp_ratio"] = _swiglu_ratio(dim, hidden_out) if swiglu else hidden_in / dim
    return fields


def _swiglu_ratio(dim: int, hidden: int) -> float:
    """An mlp_ratio whose DINOv2 SwiGLU width rule gives ``hidden`` (4.0 for ViT-g's 4096 at 1536)."""
    ratio = 1.5 * hidden / dim
    if swiglu_hidden_dim(dim, ratio) != hidden:
        raise CheckpointError(
            f"SwiGLU width {hidden} at dim {dim} fits no mlp_ratio of DINOv2's width rule; name the architecture"
        )
    return ratio


def family_arch_name(fields: Mapping[str, Any]) -> str:
    """The named architecture whose non-shape fields (interpolation rule, drop path) apply."""
    size = _SIZES.get(fields["embed_dim"], "small")
    if fields["layerscale"] or fields["patch_size"] == 14:
        return f"vit_{size}_patch14" + ("_reg4" if fields["num_register_tokens"] else "") + "_dinov2"
    size = size if size in ("small", "base") else "small"
    patch = fields["patch_size"] if fields["patch_size"] in (8, 16) else 16
    return f"vit_{size}_patch{patch}_dino"
