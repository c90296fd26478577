"""Random-weight PyTorch reference ViTs (official `dinov2` code, timm) and a small test-only weight loader.

The loader maps a DINOv2- or timm-layout state dict onto the NNX parameter tree so that the parity tests can
run without the converter (`neco_jax/convert/`, which owns the user-facing, strict conversion).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

_TOKENS = ("cls_token", "pos_embed", "mask_token", "register_tokens")
_TOKEN_LEAVES = (*_TOKENS, "reg_token", "position_embeddings")  # + timm's and transformers' names


def dinov2_reference(size: str, seed: int = 0) -> torch.nn.Module:
    """The official DINOv2 ViT-{S,B}/14 as the hub builds it (518 px, layer scale 1.0, unchunked), randomised."""
    from dinov2.models import vision_transformer as dinov2_vit

    build = {"small": dinov2_vit.vit_small, "base": dinov2_vit.vit_base}[size]
    model = build(img_size=518, patch_size=14, init_values=1.0, block_chunks=0)
    return randomize(model, seed).eval()


def timm_reference(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A timm ViT without classifier, randomised."""
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    return randomize(model, seed).eval()


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter non-trivial values: O(1) activations through all blocks, visible attention
    structure, position tables and CLS/register tokens of unit scale, layer-scale gammas around 1."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("gamma", "lambda1"):
            param.copy_(1.0 + 0.3 * noise)
        elif leaf in _TOKEN_LEAVES:
            param.copy_(noise)
        elif "norm" in name and leaf == "weight":
            param.copy_(1.0 + 0.2 * noise)
        elif leaf == "bias":
            param.copy_(0.1 * noise)
        else:  # linear and conv weights: keep the residual stream O(1) but make attention peaked
            fan_in = math.prod(param.shape[1:])
            param.copy_(noise * (1.5 / math.sqrt(fan_in)))
    return model


def relative_error(actual, expected) -> float:
    """max|actual - expected| / max|expected| (the parity measure used throughout the tests)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def torch_params(state_dict: dict, *, layout: str) -> dict[tuple[str, ...], np.ndarray]:
    """Map a DINOv2- or timm-layout ViT state dict to {nnx param path: array} (kernels transposed to (in, out)).

    timm's DINOv2-register layout stores a table without the CLS position (CLS already folded into
    `cls_token`) and names the registers `reg_token`: the table gets a zero CLS row.
    """
    if layout not in ("dinov2", "timm"):
        raise ValueError(layout)
    out = {}
    for key, tensor in state_dict.items():
        value = _as_array(tensor)
        parts = key.split(".")
        leaf = parts[-1]
        if key == "reg_token":
            out[("register_tokens",)] = value
        elif key == "pos_embed" and layout == "timm" and math.isqrt(value.shape[1]) ** 2 == value.shape[1]:
            out[("pos_embed",)] = np.concatenate([np.zeros_like(value[:, :1]), value], axis=1)
        elif key in _TOKENS:
            out[(key,)] = value
        elif leaf == "weight" and value.ndim == 4:
            out[tuple(parts[:-1]) + ("kernel",)] = value.transpose(2, 3, 1, 0)
        elif leaf == "weight" and value.ndim == 2:
            out[tuple(parts[:-1]) + ("kernel",)] = value.T
        elif leaf == "weight":
            out[tuple(parts[:-1]) + ("scale",)] = value
        elif leaf in ("bias", "gamma"):
            out[tuple(parts)] = value
        else:
            raise KeyError(f"unmapped key {key}")
    return out


def _as_array(tensor) -> np.ndarray:
    """A float32 array of a tensor's values; a meta tensor becomes a zero-memory view of its shape."""
    if tensor.device.type == "meta":
        return np.broadcast_to(np.float32(0), tuple(tensor.shape))
    return np.asarray(tensor.detach().cpu().numpy(), dtype=np.float32)


def param_shapes(model: nnx.Module) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{nnx param path: shape} of a model (also of an `nnx.eval_shape` abstract one)."""
    return {tuple(str(p) for p in path): tuple(v.shape) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def load_torch_weights(model: nnx.Module, state_dict: dict, *, layout: str) -> nnx.Module:
    """Fill every parameter of `model` from `state_dict` (all model params must be covered, shapes must match)."""
    params = torch_params(state_dict, layout=layout)
    expected = set(param_shapes(model))
    missing, unexpected = expected - set(params), set(params) - expected
    if missing or unexpected:
        raise KeyError(f"missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    for path, value in params.items():
        node = model
        for part in path[:-1]:
            node = node[int(part)] if part.isdigit() else getattr(node, part)
        param = getattr(node, path[-1])
        if param.shape != value.shape:
            raise ValueError(f"{'/'.join(path)}: {param.shape} vs {value.shape}")
        param.set_value(jnp.asarray(value))
    return model
