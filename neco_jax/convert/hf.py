"""The Hugging Face transformers layout: a folder (config.json + model.safetensors) that
``transformers.Dinov2Model.from_pretrained`` (``Dinov2WithRegistersModel`` with registers) loads.

Keys are the checkpoint names that transformers' ``save_pretrained`` writes and every transformers
version reads (``embeddings.*``, ``encoder.layer.N.attention.attention.{query,key,value}``, ...). They
are the DINOv2 hub layout (``keymap``) renamed, with the fused qkv projection split into query, key and
value rows, so the round trip is bit-exact. transformers' blocks always have layer scales: a ViT without
them (DINO) is written with scales of exactly 1.

Position tables: transformers resizes the table to ``size=(h, w)`` (bicubic, antialiased in the register
model), which is ``interpolate_offset=0.0`` here (``interpolate_antialias`` as in that model); DINOv2's
and NeCo's own rule (``scale_factor=(h + 0.1) / G``) gives other tables at every size but the native one.
A folder made by transformers is read with transformers' rule (same outputs at every size); an export
also records its ViTConfig under ``RECORD_KEY`` in config.json and is read back with it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from neco_jax.convert import infer, keymap, torch_io
from neco_jax.convert.backbone import backbone_to_jax, resolve_arch
from neco_jax.convert.params import param_shapes
from neco_jax.convert.weight_files import Converted
from neco_jax.errors import CheckpointError, UserError

if TYPE_CHECKING:
    from neco_jax.models.vit import ViTConfig

LAYOUT = "hf"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SHARD_INDEX_FILE = "model.safetensors.index.json"
PICKLE_WEIGHTS_FILE = "pytorch_model.bin"
RECORD_KEY = "neco_jax_vit_config"
# model_type -> (model class, the config class's defaults for the fields read here).
_COMMON = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    mlp_ratio=4,
    image_size=224,
    num_channels=3,
    hidden_act="gelu",
    layer_norm_eps=1e-6,
    qkv_bias=True,
    use_swiglu_ffn=False,
)
MODEL_TYPES = {
    "dinov2": ("Dinov2Model", {**_COMMON, "patch_size": 14, "use_mask_token": True}),
    "dinov2_with_registers": ("Dinov2WithRegistersModel", {**_COMMON, "patch_size": 16, "num_register_tokens": 4}),
}
# What neco_jax's ViT fixes: a transformers config with another value describes a model it cannot run.
_FIXED = dict(num_channels=3, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True)
_RENAMES = [
    (re.compile(p), r)
    for p, r in (
        (r"^(cls_token|mask_token|register_tokens)$", r"embeddings.\1"),
        (r"^pos_embed$", "embeddings.position_embeddings"),
        (r"^patch_embed\.proj\.", "embeddings.patch_embeddings.projection."),
        (r"^norm\.", "layernorm."),
        (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layer.\1.attention.output.dense."),
        (r"^blocks\.(\d+)\.ls([12])\.gamma$", r"encoder.layer.\1.layer_scale\2.lambda1"),
        (r"^blocks\.(\d+)\.mlp\.w12\.", r"encoder.layer.\1.mlp.weights_in."),
        (r"^blocks\.(\d+)\.mlp\.w3\.", r"encoder.layer.\1.mlp.weights_out."),
        (r"^blocks\.(\d+)\.", r"encoder.layer.\1."),  # norm1, norm2, mlp.fc1, mlp.fc2 keep their names
    )
]
_QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")


def read_hf_config(folder: str | Path) -> dict[str, Any] | None:
    """The config.json of a transformers DINOv2 folder, or None for any other folder."""
    path = Path(folder) / CONFIG_FILE
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return values if isinstance(values, dict) and values.get("model_type") in MODEL_TYPES else None


def is_hf_folder(folder: str | Path) -> bool:
    return Path(folder).is_dir() and read_hf_config(folder) is not None


# --- keys ---------------------------------------------------------------------------------------------


def _hf_keys(hub_key: str) -> list[str]:
    """transformers key(s) of one DINOv2-hub key: three for a fused qkv tensor, else one."""
    m = _QKV.match(hub_key)
    if m:
        return [f"encoder.layer.{m[1]}.attention.attention.{part}.{m[2]}" for part in ("query", "key", "value")]
    for pattern, repl in _RENAMES:
        if pattern.match(hub_key):
            return [pattern.sub(repl, hub_key)]
    raise KeyError(hub_key)  # every key of the hub layout has a rule above


def hub_to_hf(hub: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """DINOv2-hub state dict -> transformers checkpoint keys (qkv split into equal query/key/value rows)."""
    out = {}
    for key, value in hub.items():
        names = _hf_keys(key)
        for name, part in zip(names, np.split(np.asarray(value), len(names), axis=0)):
            out[name] = part
    return out


def hf_to_hub(hf: Mapping[str, np.ndarray], hub_shapes: Mapping[str, tuple], what: str) -> dict[str, np.ndarray]:
    """transformers checkpoint -> DINOv2-hub state dict with exactly the keys of ``hub_shapes``, strictly."""
    views = {k: np.broadcast_to(np.zeros((), np.float32), s) for k, s in hub_shapes.items()}
    expected = {k: v.shape for k, v in hub_to_hf(views).items()}
    keymap.check_keys(
        hf,
        expected,
        what,
        "Is it a Dinov2Model / Dinov2WithRegistersModel checkpoint whose config.json matches its weights?",
    )
    return {key: np.concatenate([hf[name] for name in _hf_keys(key)], axis=0) for key in hub_shapes}


# --- configs ------------------------------------------------------------------------------------------


def _square(value: Any, name: str, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise CheckpointError(f"{what}: {name} {value} is not square; neco_jax's ViT needs a square {name}")
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise CheckpointError(f"{what}: {name} must be a positive integer, got {value!r}")
    return value


def vit_config(hf: Mapping[str, Any], what: str) -> ViTConfig:
    """The ViTConfig for a transformers DINOv2 config (its position rule; the exported record if present)."""
    from neco_jax.models.vit import ViTConfig  # Flax: reading weights runs without JAX

    model_type = hf["model_type"]
    values = {**MODEL_TYPES[model_type][1], **hf}
    for name, fixed in _FIXED.items():
        if values[name] != fixed:
            raise CheckpointError(f"{what}: {name} is {values[name]!r}; neco_jax's ViT has {name}={fixed!r} only")
    patch = _square(values["patch_size"], "patch_size", what)
    registers = values["num_register_tokens"] if model_type == "dinov2_with_registers" else 0
    fields = dict(
        patch_size=patch,
        embed_dim=values["hidden_size"],
        depth=values["num_hidden_layers"],
        num_heads=values["num_attention_heads"],
        mlp_ratio=float(values["mlp_ratio"]),
        ffn_layer="swiglu" if values["use_swiglu_ffn"] else "mlp",
        num_register_tokens=registers,
        layerscale=True,
        pos_grid=_square(values["image_size"], "image_size", what) // patch,
        has_mask_token=bool(registers or values["use_mask_token"]),
        interpolate_offset=0.0,
        interpolate_antialias=bool(registers),
    )
    config = resolve_arch(infer.family_arch_name(fields), **fields)
    if RECORD_KEY not in hf:
        return config
    try:
        recorded = ViTConfig.from_dict(hf[RECORD_KEY])
    except (TypeError, UserError) as err:
        raise CheckpointError(
            f"{what}: {RECORD_KEY} is not a ViTConfig ({err}); remove it to use the transformers fields alone"
        ) from err
    shape_fields = (
        "patch_size",
        "embed_dim",
        "depth",
        "num_heads",
        "ffn_layer",
        "num_register_tokens",
        "pos_grid",
        "mlp_hidden_dim",
    )
    differ = [
        f"{f} {getattr(recorded, f)!r} vs {getattr(config, f)!r}"
        for f in shape_fields
        if getattr(recorded, f) != getattr(config, f)
    ]
    if differ:
        raise CheckpointError(
            f"{what}: {RECORD_KEY} disagrees with the transformers fields ({', '.join(differ)}); "
            f"remove {RECORD_KEY} to use the transformers fields alone"
        )
    return recorded


def hf_config(config: ViTConfig) -> dict[str, Any]:
    """transformers config.json values for ``config`` (plus the ViTConfig itself under ``RECORD_KEY``)."""
    if config.mlp_ratio != int(config.mlp_ratio):
        raise UserError(
            f"mlp_ratio {config.mlp_ratio} has no place in the hf layout (transformers' DINOv2 config "
            "takes a whole number); export to the dinov2 or timm layout instead"
        )
    model_type = "dinov2_with_registers" if config.num_register_tokens else "dinov2"
    out = dict(
        architectures=[MODEL_TYPES[model_type][0]],
        model_type=model_type,
        hidden_size=config.embed_dim,
        num_hidden_layers=config.depth,
        num_attention_heads=config.num_heads,
        mlp_ratio=int(config.mlp_ratio),
        use_swiglu_ffn=config.ffn_layer == "swiglu",
        image_size=config.pos_grid * config.patch_size,
        patch_size=config.patch_size,
        layerscale_value=1.0,
        drop_path_rate=0.0,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.02,
        dtype="float32",
        **_FIXED,
    )
    if config.num_register_tokens:
        out["num_register_tokens"] = config.num_register_tokens
    else:
        out["use_mask_token"] = config.has_mask_token
    out[RECORD_KEY] = config.to_dict()
    return out


def _hf_shaped(config: ViTConfig) -> ViTConfig:
    """The architecture as transformers stores it: layer scales always, a mask token with registers."""
    return dataclasses.replace(
        config, layerscale=True, has_mask_token=config.has_mask_token or bool(config.num_register_tokens)
    )


# --- folders ------------------------------------------------------------------------------------------


def to_hf_state_dict(config: ViTConfig, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """NNX parameters -> transformers checkpoint (missing layer scales as ones, missing mask token as zeros)."""
    hub = keymap.to_torch({p: np.asarray(v) for p, v in params.items()}, "dinov2")
    full = keymap.expected_torch_shapes(param_shapes(_hf_shaped(config)), "dinov2")
    for key in full.keys() - hub.keys():
        hub[key] = (np.ones if key.endswith(".gamma") else np.zeros)(full[key], np.float32)
    return hub_to_hf(hub)


def write_folder(converted: Converted, folder: str | Path) -> list[str]:
    """Write the new ``folder``/config.json and model.safetensors; returns notes on what the layout changed."""
    folder = Path(folder)
    if folder.exists():
        raise UserError(f"--out {folder} already exists; the hf layout is written into a new folder only")
    if folder.suffix.lower() in (*torch_io.PICKLE_SUFFIXES, torch_io.SAFETENSORS_SUFFIX):
        raise UserError(f"--out {folder}: the hf layout is a folder (config.json + {WEIGHTS_FILE}); name a folder")
    config = converted.config
    values = hf_config(config)
    torch_io.write_state_dict(
        to_hf_state_dict(config, converted.params), folder / WEIGHTS_FILE, metadata={"format": "pt"}
    )
    (folder / CONFIG_FILE).write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    notes = []
    if not config.layerscale:
        notes.append("layer scales of 1 added (transformers' blocks always have them)")
    if config.num_register_tokens and not config.has_mask_token:
        notes.append("a zero mask_token added (unused in the forward pass)")
    if converted.head_config is not None:
        notes.append("projection head left out (transformers' model has none)")
    return notes


def _read_weights(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of a transformers folder: model.safetensors, its shards, or pytorch_model.bin."""
    if (folder / WEIGHTS_FILE).is_file():
        return torch_io.read_state_dict(folder / WEIGHTS_FILE)
    if (folder / SHARD_INDEX_FILE).is_file():
        try:
            shards = sorted(set(json.loads((folder / SHARD_INDEX_FILE).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as err:
            raise UserError(f"{folder / SHARD_INDEX_FILE} is not a shard index ({err})") from err
        return {k: v for shard in shards for k, v in torch_io.read_state_dict(folder / shard).items()}
    if (folder / PICKLE_WEIGHTS_FILE).is_file():
        return torch_io.read_state_dict(folder / PICKLE_WEIGHTS_FILE)
    raise UserError(
        f"{folder} has a transformers {CONFIG_FILE} but no {WEIGHTS_FILE}, {SHARD_INDEX_FILE} or {PICKLE_WEIGHTS_FILE}"
    )


def read_folder(folder: str | Path, arch: str | ViTConfig | None = None) -> Converted:
    """A transformers DINOv2 folder as a converted ViT (``arch`` replaces the config's architecture)."""
    folder = Path(folder)
    hf = read_hf_config(folder)
    config = resolve_arch(arch) if arch is not None else vit_config(hf, str(folder / CONFIG_FILE))
    what = str(folder)
    state = _read_weights(folder)
    prefix = f"{hf['model_type']}."  # a task model (e.g. ...ForImageClassification) keeps the ViT under it
    if any(k.startswith(prefix) for k in state):  # its task head (classifier.*) is not part of the backbone
        state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    hub_shapes = keymap.expected_torch_shapes(param_shapes(_hf_shaped(config)), "dinov2")
    hub = hf_to_hub(state, hub_shapes, what)
    if not config.layerscale:
        scales = [k for k in hub if k.endswith(".gamma")]
        if any(np.any(hub[k] != 1) for k in scales):
            raise CheckpointError(
                f"{what}: the architecture has no layer scales but the file's are not all 1; "
                "name an architecture with layerscale=True"
            )
        hub = {k: v for k, v in hub.items() if k not in scales}
    if not config.has_mask_token:
        hub.pop("mask_token", None)
    config, params = backbone_to_jax(hub, dataclasses.replace(config, has_mask_token="mask_token" in hub), what=what)
    return Converted(config, params)
