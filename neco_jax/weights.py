"""A training run's weights in and out: the models of its settings, its initial weights (`model.init`: random,
a pretrained name, a weight file or folder, a NeCo checkpoint), and the export of both backbones at its end."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neco_jax import distributed, save_backbone
from neco_jax import train_state as ts
from neco_jax.backbone_io import load_parts
from neco_jax.convert import export_file, flatten_params, unflatten_params_like
from neco_jax.errors import ConfigError, NonFiniteError
from neco_jax.models import ProjectionHead, VisionTransformer, ViTConfig
from neco_jax.settings import HeadSettings, TrainSettings


def _head(settings: HeadSettings, embed_dim: int, rngs: nnx.Rngs) -> ProjectionHead:
    return ProjectionHead(
        embed_dim, hidden_dim=settings.hidden_dim, out_dim=settings.out_dim, num_layers=settings.num_layers, rngs=rngs
    )


def build_models(settings: TrainSettings, has_mask_token: bool | None = None) -> ts.Models:
    """The graph definitions of student/teacher backbones and the head, nothing allocated."""
    s_cfg, t_cfg = ts.vit_configs(settings.model, has_mask_token)
    defs = []
    for cfg in (s_cfg, t_cfg):
        defs.append(ts.split(nnx.eval_shape(lambda c=cfg: VisionTransformer(c, rngs=nnx.Rngs(0))))[0])
    head_def = ts.split(nnx.eval_shape(lambda: _head(settings.head, s_cfg.embed_dim, nnx.Rngs(0))))[0]
    return ts.Models(student_backbone=defs[0], teacher_backbone=defs[1], head=head_def, patch_size=s_cfg.patch_size)


def random_params(settings: TrainSettings, seed: int, has_mask_token: bool | None = None) -> tuple[dict, dict]:
    """(student, teacher) params: one random backbone for both (as both load the same weights in the
    original), and two independently initialised heads (the original never copies the head)."""
    s_cfg, _ = ts.vit_configs(settings.model, has_mask_token)
    return _initializer(s_cfg, settings.head)(jax.random.PRNGKey(seed))


@functools.lru_cache(maxsize=8)
def _initializer(vit: ViTConfig, head: HeadSettings):
    """`random_params`' jitted program for one architecture and head, made once per process: a later run of the
    same models (a resume, a notebook, the tests) reuses its trace and executable."""

    def init(key):
        kb, ks, kt = jax.random.split(key, 3)
        backbone = ts.split(VisionTransformer(vit, rngs=nnx.Rngs(kb)))[1]
        s_head = ts.split(_head(head, vit.embed_dim, nnx.Rngs(ks)))[1]
        t_head = ts.split(_head(head, vit.embed_dim, nnx.Rngs(kt)))[1]
        return {"backbone": backbone, "head": s_head}, {"backbone": backbone, "head": t_head}

    return jax.jit(init)


def initial_params(settings: TrainSettings) -> tuple[dict, dict, str]:
    """(student, teacher, description) from `model.init`: "random", or weights.

    Weights go through `neco_jax.backbone_io.load_parts` (pretrained names are downloaded and cached)
    and are placed into the recipe's architecture: parameters the recipe's model lacks (e.g. the
    `register_tokens` of register weights in an XR recipe) are dropped, as the original's strict=False
    load does, and named in the log; a parameter the weights lack is an error. A NeCo training checkpoint
    restores the student and the teacher, projection heads included, as the original's `only_load_weights`
    loads its whole Lightning state dict; any other weights go into both backbones, heads random.
    """
    init, seed = settings.model.init, settings.run.seed
    if init == "random":
        student, teacher = random_params(settings, seed)
        return student, teacher, f"random init (seed {seed})"
    parts = load_parts(init)
    both = {"student", "teacher"} <= set(parts)
    first = parts["student"] if both else next(iter(parts.values()))
    student, teacher = random_params(settings, seed, has_mask_token="mask_token" in first.params)
    models = {"student": (student, first), "teacher": (teacher, parts["teacher"] if both else first)}
    out, notes = {}, []
    for name, (params, converted) in models.items():
        pure = ts.to_pure(params)
        backbone, dropped = _fill(pure["backbone"], converted.params, settings, "backbone")
        head, head_note = pure["head"], "head random"
        if both and converted.head_params is not None:
            head, head_note = _fill(pure["head"], converted.head_params, settings, "head")[0], "head loaded"
        out[name] = ts.from_pure(params, {"backbone": backbone, "head": head})
        note = (
            f"{name}: {len(flatten_params(backbone))} of {len(converted.params)} backbone tensors loaded, {head_note}"
        )
        notes.append(note + (f", dropped (not in this model): {', '.join(dropped)}" if dropped else ""))
    source = "student and teacher of a NeCo checkpoint" if both else "one backbone into both models"
    return out["student"], out["teacher"], f"{init} ({source}): " + "; ".join(notes)


def _fill(template: dict, loaded: Mapping[str, Any], settings: TrainSettings, what: str) -> tuple[dict, list[str]]:
    """`template`'s tree with the values of `loaded` ('/'-joined paths), and the loaded paths it has no place for."""
    wanted = flatten_params(template)
    missing = sorted(p for p in wanted if p not in loaded)
    mismatched = sorted(
        f"{p} {loaded[p].shape} vs {wanted[p].shape}"
        for p in wanted
        if p in loaded and tuple(loaded[p].shape) != tuple(wanted[p].shape)
    )
    model = settings.model
    if missing or mismatched:
        fix = "choose the recipe that matches these weights" if what == "backbone" else "set config.head.* to match"
        raise ConfigError(
            f"{model.init} does not fit the {what} of config.model.arch={model.arch!r} with "
            f"{model.num_register_tokens} registers: missing {missing}, shape mismatch {mismatched}; {fix}"
        )
    nonfinite = sorted(p for p in wanted if not np.all(np.isfinite(np.asarray(loaded[p]))))
    if nonfinite:  # the step would skip every update and the first checkpoint would hold them
        raise NonFiniteError(f"{model.init} holds NaN or infinite values in {nonfinite}; start from intact weights")
    values = {p: jnp.asarray(loaded[p]) for p in wanted}
    return unflatten_params_like(template, values), sorted(p for p in loaded if p not in wanted)


def export_backbones(
    settings: TrainSettings, models: ts.Models, state: ts.TrainState, folder: str | os.PathLike
) -> list[str]:
    """Student and teacher as neco_jax folders (backbone + head) and as PyTorch state dicts.

    The PyTorch files use the DINOv2 hub layout for patch-14 DINOv2 models and timm's for DINO models, so
    `torch.hub.load('facebookresearch/dinov2', ...)` / `timm.create_model(...)` load them with strict=True;
    without torch installed they are written as .safetensors.
    """
    try:
        import torch  # noqa: F401  (optional and heavy: only to choose the file type)

        suffix = ".pth"
    except ImportError:
        suffix = ".safetensors"
    layout = "timm" if settings.model.arch.endswith("_dino") else "dinov2"
    parts = {"student": (models.student_backbone, state.student)}
    if settings.loss.use_teacher:
        parts["teacher"] = (models.teacher_backbone, state.teacher)
    written = []
    for name, (backbone_def, params) in parts.items():
        params = distributed.host_copy(params)
        backbone, head = nnx.merge(backbone_def, params["backbone"]), nnx.merge(models.head, params["head"])
        written.append(str(save_backbone(backbone, os.path.join(folder, name), head=head)))
        path = os.path.join(folder, f"{name}_{layout}{suffix}")
        written.append(str(export_file(backbone.config, flatten_params(ts.to_pure(params["backbone"])), layout, path)))
    return written
