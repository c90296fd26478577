"""NeCo post-training: the big_vision-style loop around one jitted, data-parallel train step.

Sections, in the order they run: config checks -> mesh -> input -> models & optimizer -> restore-or-init
(a checkpoint in the workdir, else `config.model.init`: a pretrained name, a weight file/folder, or
"random") -> the jitted step -> the loop (metrics, checkpoints, SIGTERM) -> curves (metrics.png) -> export
of both backbones. The loop keeps the device busy: batches are put on the devices ahead of use and the
metrics summed there; the host waits for the device only at log and checkpoint steps (neco_jax/step_feed.py).

The step (`make_train_step`) is a pure function of (TrainState, global batch): the batch is sharded along
the mesh's "data" axis, the state replicated and donated; every mean is over the global batch, so the
result does not depend on the number of devices. Order inside a step, as in the original: forward passes
and loss (which also pushes this step's teacher vectors into the queue) -> gradients -> EMA of the teacher
towards the *pre-update* student (the original's one-step lag, see ema.py) -> AdamW update.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from input_pipeline import augment, make_train_loader
from input_pipeline.loader import view_config_from
from input_pipeline.views import view_shapes
from neco_jax import checkpoint as ckpt_lib
from neco_jax import curves, distributed, ema, memory_fit, optim, run_record, save_backbone, sharding, step_feed
from neco_jax import loss as loss_lib
from neco_jax import metrics_writer as mw
from neco_jax import queue as queue_lib
from neco_jax import train_state as ts
from neco_jax.backbone_io import load_parts
from neco_jax.convert import export_file, flatten_params, unflatten_params_like
from neco_jax.errors import ConfigError, NonFiniteError, StepMemoryError
from neco_jax.fg_mask import attention_fg_mask
from neco_jax.models import ProjectionHead, VisionTransformer
from neco_jax.models import attention as attention_lib
from neco_jax.precision import true_float32

log = logging.getLogger(__name__)

# The batch keys the step consumes (the loader's `index` and `skipped` stay on the host; the colour parameters
# come only with data.augment_on="device").
DEVICE_KEYS = ("global_crops", "local_crops", "boxes_gc", "boxes_all", "global_colour", "local_colour")
PREFETCH_BATCHES = 2  # batches placed on the devices ahead of the step


# --------------------------------------------------------------------------- config checks


def check_config(config: ml_collections.ConfigDict) -> None:
    """Reject values the run cannot use, naming the field and the fix, before anything is built."""
    m, o, loss = config.model, config.optim, config.loss
    if not m.init:
        raise ConfigError(
            "config.model.init is empty: name the initial weights, e.g. "
            "--config.model.init=/path/to/checkpoint.pth (or a pretrained name, or 'random')"
        )
    d = config.data
    if not d.data_dir and d.dataset_name != "sample" and not d.dataset_name.startswith("tfds:"):
        raise ConfigError(
            f"config.data.data_dir is empty: set --config.data.data_dir=/path/to/the/"
            f"{d.dataset_name} images (the bundled sample photos train only with "
            "data.dataset_name='sample', as configs/demo.py does)"
        )
    choices = {
        "optim.on_nonfinite": (o.on_nonfinite, ("error", "skip")),
        "loss.sort_net": (loss.sort_net, ("bitonic", "odd_even")),
        "loss.sim_dist": (loss.sim_dist, ("cosine", "euclidean")),
        "loss.loss_mask": (loss.loss_mask, ("all", "fg", "bg")),
        "model.dtype": (m.dtype, ("float32", "bfloat16")),
        "model.attention": (m.attention, attention_lib.IMPLEMENTATIONS),
    }
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"config.{name}={value!r} is not one of {allowed}")
    _check_finite(config.to_dict(), "config")
    positive = {
        "optim.batch_size": o.batch_size,
        "optim.num_epochs": o.num_epochs,
        "optim.max_consecutive_skips": o.max_consecutive_skips,
        "log_every_steps": config.log_every_steps,
        "checkpoint_every_steps": config.checkpoint_every_steps,
        "keep_checkpoints": config.keep_checkpoints,
        "loss.queue_length": loss.queue_length,
        "loss.roi_align_kernel_size": loss.roi_align_kernel_size,
        "head.hidden_dim": config.head.hidden_dim,
        "head.out_dim": config.head.out_dim,
        "head.num_layers": config.head.num_layers,
        "init_timeout_s": config.init_timeout_s,
        "stop_check_every_steps": config.stop_check_every_steps,
    }
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"config.{name}={value} must be >= 1")
    for name in (
        "lr_backbone",
        "lr_heads",
        "final_lr",
        "weight_decay",
        "weight_decay_end",
        "total_steps",
        "grad_clip_norm",
    ):
        if o[name] < 0:
            raise ConfigError(f"config.optim.{name}={o[name]} must be >= 0")
    if m.num_register_tokens < 0:
        raise ConfigError(f"config.model.num_register_tokens={m.num_register_tokens} must be >= 0")
    if not 0 <= m.drop_path_rate < 1:
        raise ConfigError(f"config.model.drop_path_rate={m.drop_path_rate} must lie in [0, 1)")
    if not 0 <= config.ema.momentum <= 1 or not 0 <= config.ema.momentum_end <= 1:
        raise ConfigError(
            f"config.ema.momentum={config.ema.momentum} and momentum_end={config.ema.momentum_end} must lie in [0, 1]"
        )
    if loss.student_steepness <= 0 or loss.teacher_steepness <= 0:
        raise ConfigError("config.loss.student_steepness and teacher_steepness must be > 0")
    if tuple(loss.crops_for_assign) != tuple(range(config.data.nmb_samples[0])):
        raise ConfigError(
            f"config.loss.crops_for_assign={tuple(loss.crops_for_assign)} must list every global "
            f"crop, 0..{config.data.nmb_samples[0] - 1}"
        )
    _check_crop_sizes(view_config_from(d).size_crops, ts.vit_configs(config)[0])


def _check_crop_sizes(sizes: tuple[int, ...], vit) -> None:
    """A crop side that is not a multiple of the patch size: the patch embedding (a strided convolution) sees
    side // patch patches and drops the pixels past the last one. The original's DINOv2 backbones refuse such
    crops (`src/layers/patch_embed.py` asserts); its DINO backbone (`src/models/vit.py`, the ViTs with
    drop_path_mode "per_sample") drops them, as its DINO recipes' 98-px local crops at patch 16 do. So here too:
    refused for the first, a warning naming the dropped pixels for the second."""
    patch = vit.patch_size
    for kind, size in zip(("global", "local"), sizes):
        if size % patch == 0:
            continue
        what = (
            f"config.data.size_crops={sizes}: the {kind} crop side {size} px is not a multiple of the patch size "
            f"{patch} of {vit.arch}"
        )
        if vit.drop_path_mode != "per_sample":
            raise ConfigError(
                f"{what}, which the original's DINOv2 backbone refuses; use {size // patch * patch} or "
                f"{(size // patch + 1) * patch} px"
            )
        log.warning(
            "%s: the patch embedding sees %d x %d patches and drops the last %d pixel rows and columns of every "
            "%s crop, as the original does",
            what,
            size // patch,
            size // patch,
            size % patch,
            kind,
        )


def _check_finite(node: Any, name: str) -> None:
    """Every number in the config is finite: a NaN passes every range check written as `x < 0`."""
    if isinstance(node, dict):
        for key, value in node.items():
            _check_finite(value, f"{name}.{key}")
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            _check_finite(value, f"{name}[{i}]")
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{name}={node} is not a finite number")


# --------------------------------------------------------------------------- models


def _head(config, embed_dim: int, rngs: nnx.Rngs) -> ProjectionHead:
    h = config.head
    return ProjectionHead(embed_dim, hidden_dim=h.hidden_dim, out_dim=h.out_dim, num_layers=h.num_layers, rngs=rngs)


def build_models(config, has_mask_token: bool | None = None) -> ts.Models:
    """The graph definitions of student/teacher backbones and the head, nothing allocated."""
    s_cfg, t_cfg = ts.vit_configs(config, has_mask_token)
    defs = []
    for cfg in (s_cfg, t_cfg):
        defs.append(ts.split(nnx.eval_shape(lambda c=cfg: VisionTransformer(c, rngs=nnx.Rngs(0))))[0])
    head_def = ts.split(nnx.eval_shape(lambda: _head(config, s_cfg.embed_dim, nnx.Rngs(0))))[0]
    return ts.Models(student_backbone=defs[0], teacher_backbone=defs[1], head=head_def, patch_size=s_cfg.patch_size)


def random_params(config, seed: int, has_mask_token: bool | None = None) -> tuple[dict, dict]:
    """(student, teacher) params: one random backbone for both (as both load the same weights in the
    original), and two independently initialised heads (the original never copies the head)."""
    s_cfg, _ = ts.vit_configs(config, has_mask_token)

    def init(key):
        kb, ks, kt = jax.random.split(key, 3)
        backbone = ts.split(VisionTransformer(s_cfg, rngs=nnx.Rngs(kb)))[1]
        s_head = ts.split(_head(config, s_cfg.embed_dim, nnx.Rngs(ks)))[1]
        t_head = ts.split(_head(config, s_cfg.embed_dim, nnx.Rngs(kt)))[1]
        return {"backbone": backbone, "head": s_head}, {"backbone": backbone, "head": t_head}

    return jax.jit(init)(jax.random.PRNGKey(seed))


def initial_params(config) -> tuple[dict, dict, str]:
    """(student, teacher, description) from `config.model.init`: "random", or weights.

    Weights go through `neco_jax.backbone_io.load_parts` (pretrained names are downloaded and cached)
    and are placed into the recipe's architecture: parameters the recipe's model lacks (e.g. the
    `register_tokens` of register weights in an XR recipe) are dropped, as the original's strict=False
    load does, and named in the log; a parameter the weights lack is an error. A NeCo training checkpoint
    restores the student and the teacher, projection heads included, as the original's `only_load_weights`
    loads its whole Lightning state dict; any other weights go into both backbones, heads random.
    """
    if config.model.init == "random":
        student, teacher = random_params(config, config.seed)
        return student, teacher, f"random init (seed {config.seed})"
    parts = load_parts(config.model.init)
    both = {"student", "teacher"} <= set(parts)
    first = parts["student"] if both else next(iter(parts.values()))
    student, teacher = random_params(config, config.seed, has_mask_token="mask_token" in first.params)
    models = {"student": (student, first), "teacher": (teacher, parts["teacher"] if both else first)}
    out, notes = {}, []
    for name, (params, converted) in models.items():
        pure = ts.to_pure(params)
        backbone, dropped = _fill(pure["backbone"], converted.params, config, "backbone")
        head, head_note = pure["head"], "head random"
        if both and converted.head_params is not None:
            head, head_note = _fill(pure["head"], converted.head_params, config, "head")[0], "head loaded"
        out[name] = ts.from_pure(params, {"backbone": backbone, "head": head})
        note = (
            f"{name}: {len(flatten_params(backbone))} of {len(converted.params)} backbone tensors loaded, {head_note}"
        )
        notes.append(note + (f", dropped (not in this model): {', '.join(dropped)}" if dropped else ""))
    source = "student and teacher of a NeCo checkpoint" if both else "one backbone into both models"
    return out["student"], out["teacher"], f"{config.model.init} ({source}): " + "; ".join(notes)


def _fill(template: dict, loaded: Mapping[str, Any], config, what: str) -> tuple[dict, list[str]]:
    """`template`'s tree with the values of `loaded` ('/'-joined paths), and the loaded paths it has no place for."""
    wanted = flatten_params(template)
    missing = sorted(p for p in wanted if p not in loaded)
    mismatched = sorted(
        f"{p} {loaded[p].shape} vs {wanted[p].shape}"
        for p in wanted
        if p in loaded and tuple(loaded[p].shape) != tuple(wanted[p].shape)
    )
    if missing or mismatched:
        fix = "choose the recipe that matches these weights" if what == "backbone" else "set config.head.* to match"
        raise ConfigError(
            f"{config.model.init} does not fit the {what} of config.model.arch={config.model.arch!r} with "
            f"{config.model.num_register_tokens} registers: missing {missing}, shape mismatch {mismatched}; {fix}"
        )
    nonfinite = sorted(p for p in wanted if not np.all(np.isfinite(np.asarray(loaded[p]))))
    if nonfinite:  # the step would skip every update and the first checkpoint would hold them
        raise NonFiniteError(
            f"{config.model.init} holds NaN or infinite values in {nonfinite}; start from intact weights"
        )
    values = {p: jnp.asarray(loaded[p]) for p in wanted}
    return unflatten_params_like(template, values), sorted(p for p in loaded if p not in wanted)


# --------------------------------------------------------------------------- the step


def _forward(
    backbone_def: nnx.GraphDef,
    head_def: nnx.GraphDef,
    params: dict,
    crops: jax.Array,
    *,
    key: jax.Array | None,
    return_attention: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """Crops (B, C, H, W, 3) -> unit head vectors (B, C, h, w, out_dim) (+ CLS attention (B, C, heads, h*w)).

    All crops of one resolution go through the backbone as one batch (image-major, so the data sharding
    carries over without communication), as the original groups crops by resolution.
    """
    b, c, height, width, _ = crops.shape
    backbone = nnx.merge(backbone_def, params["backbone"])
    head = nnx.merge(head_def, params["head"])
    out = backbone(
        crops.reshape(b * c, height, width, 3), deterministic=key is None, key=key, return_attention=return_attention
    )
    p = backbone.config.patch_size
    feats = head(out["x_norm_patchtokens"]).reshape(b, c, height // p, width // p, -1)
    attn = out["attn_cls"].reshape(b, c, *out["attn_cls"].shape[1:]) if return_attention else None
    return feats, attn


def neco_step_loss(lcfg, patch_size: int, s_glob, s_loc, t_glob, attn, batch, queue, key):
    """`neco_jax.loss.neco_loss` with the config's options -> (loss, (queue, aux)); `queue` is {} without one."""
    fg = None
    if lcfg.loss_mask != "all":
        fg = attention_fg_mask(attn, t_glob.shape[2:4])
    loss, aux, new_queue = loss_lib.neco_loss(
        s_glob,
        s_loc,
        t_glob,
        batch["boxes_gc"],
        batch["boxes_all"],
        queue or None,
        key,
        patch_size=patch_size,
        student_steepness=lcfg.student_steepness,
        teacher_steepness=lcfg.teacher_steepness,
        network=lcfg.sort_net,
        distribution=lcfg.distribution,
        similarity=lcfg.sim_dist,
        output_size=lcfg.roi_align_kernel_size,
        loss_mask=lcfg.loss_mask,
        fg_mask=fg,
        original_counter=lcfg.queue_original_counter,
        detach_teacher=lcfg.use_teacher,
    )
    return loss, (queue if new_queue is None else new_queue, aux)


def make_loss_fn(config, models: ts.Models, labels: Any):
    """`loss_fn(student, teacher, queue, batch, key) -> (loss, (new_queue, aux))`, differentiable in `student`."""
    lcfg = config.loss
    use_teacher = lcfg.use_teacher
    need_attn = lcfg.loss_mask != "all"
    frozen = jax.tree.map(lambda lab: lab == optim.FROZEN, labels)

    def loss_fn(student, teacher, queue, batch, key):
        k_glob, k_loc, k_self, k_loss = jax.random.split(key, 4)
        # Frozen params get no gradient, and XLA skips computing their weight gradients.
        student = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, student, frozen)
        s_glob, _ = _forward(models.student_backbone, models.head, student, batch["global_crops"], key=k_glob)
        s_loc, _ = _forward(models.student_backbone, models.head, student, batch["local_crops"], key=k_loc)
        if use_teacher:
            t_glob, attn = _forward(
                models.teacher_backbone,
                models.head,
                teacher,
                batch["global_crops"],
                key=None,
                return_attention=need_attn,
            )
            t_glob = jax.lax.stop_gradient(t_glob)
        else:  # the original's no-teacher ablation: a second student pass (drop path on) is the target
            t_glob, attn = _forward(
                models.student_backbone,
                models.head,
                student,
                batch["global_crops"],
                key=k_self,
                return_attention=need_attn,
            )
        attn = None if attn is None else jax.lax.stop_gradient(attn)
        return neco_step_loss(lcfg, models.patch_size, s_glob, s_loc, t_glob, attn, batch, queue, k_loss)

    return loss_fn


def make_train_step(config, models: ts.Models, labels: Any, tx: optax.GradientTransformation, total_steps: int):
    """The pure step `(state, batch) -> (state, metrics)`; jit it with `jit_train_step`. A batch of uint8 crops
    (data.augment_on="device") gets its colour augmentation and normalisation first, inside the step."""
    use_teacher = config.loss.use_teacher
    rate_fn = ema.ema_rate_schedule(config.ema.momentum, config.ema.momentum_end, total_steps)
    loss_fn = make_loss_fn(config, models, labels)
    colour = augment.from_config(config.data)

    def step(state: ts.TrainState, batch: dict) -> tuple[ts.TrainState, dict]:
        batch = colour(batch)
        key, rng = jax.random.split(state.rng)
        (loss, (queue, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.student, state.teacher, state.queue, batch, key
        )
        grad_norm = optim.trained_grad_norm(grads, labels)
        updates, opt_state = tx.update(grads, state.opt_state, state.student)
        student = optax.apply_updates(state.student, updates)
        rate = rate_fn(state.step)
        teacher = ema.ema_update(state.teacher, state.student, rate) if use_teacher else state.teacher
        # The new state itself is checked too: a finite loss and gradient can still give a non-finite update
        # (an overflowing step, a NaN schedule value), which must never reach a checkpoint or an export.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite((student, teacher, opt_state, queue))
        # A non-finite step changes nothing but the step counter and the RNG (both modes; "error" then stops).
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = ts.TrainState(
            step=state.step + 1,
            student=keep(student, state.student),
            teacher=keep(teacher, state.teacher),
            opt_state=keep(opt_state, state.opt_state),
            queue=keep(queue, state.queue),
            rng=rng,
            skipped=state.skipped + (~finite).astype(jnp.int32),
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "finite": finite,
            "momentum": 1.0 - rate,
            "nonfinite_steps": new_state.skipped,
            **optim.hyperparams(config.optim, total_steps, state.step),
            **aux,
        }
        return new_state, metrics

    return step


def _all_finite(tree: Any) -> jax.Array:
    """One boolean: every floating-point entry of `tree` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def jit_train_step(step_fn, mesh, carried: int = 0) -> Any:
    """jit over the mesh: state replicated and donated, batch sharded along "data", metrics replicated;
    `carried` more replicated arguments after the batch (step_feed.with_sums), donated and returned last."""
    repl = sharding.replicated(mesh)
    return jax.jit(
        step_fn,
        in_shardings=(repl, sharding.batch_sharding(mesh)) + (repl,) * carried,
        out_shardings=(repl,) * (2 + carried),
        donate_argnums=(0, *range(2, 2 + carried)),
    )


def nonfinite_cap(config) -> int:
    """Non-finite steps in a row that stop training: "error" stops at the first, "skip" at the
    max_consecutive_skips-th (the `cap` of step_feed.with_sums)."""
    return 1 if config.optim.on_nonfinite == "error" else config.optim.max_consecutive_skips


def jit_loop_step(config, step_fn, mesh) -> Any:
    """The training loop's program: `step_fn` with the metric sums carried (`(state, batch, sums) -> (state,
    metrics, sums)`), jitted over the mesh. The bench and the tests that time or probe the loop's step build it
    here too, so they run (and the compilation cache serves) the very same program."""
    return jit_train_step(step_feed.with_sums(step_fn, nonfinite_cap(config)), mesh, carried=1)


def batch_spec(config, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the step takes (its DEVICE_KEYS) as shapes sharded along "data": what the step is
    compiled for before any image is read."""
    b, data = config.optim.batch_size, sharding.batch_sharding(mesh)
    shapes = view_shapes(view_config_from(config.data))
    return {k: jax.ShapeDtypeStruct((b, *shape), dtype, sharding=data) for k, (shape, dtype) in shapes.items()}


def with_remat(config, remat: str):
    """A copy of `config` with model.remat set (one of memory_fit.REMAT_VALUES)."""
    config = config.copy_and_resolve_references()
    config.model.remat = remat
    return config


def compile_loop_step(
    config,
    total_steps: int,
    state,
    labels,
    tx,
    mesh,
    limit: int | None,
    has_mask_token: bool | None = None,
    compiler_options: dict | None = None,
) -> tuple[memory_fit.Fit, ts.Models]:
    """The loop's program (`jit_loop_step`) compiled ahead for `state` (arrays or shapes) and `batch_spec`, for
    each rematerialisation config.model.remat allows until one needs at most `limit` bytes per device (None:
    the first; see neco_jax.memory_fit). Returns the outcome and the models of the choice taken. The planner
    (neco_jax.plan) compiles the same for devices this machine lacks."""
    batch = batch_spec(config, mesh)
    sums = jax.eval_shape(lambda: step_feed.empty_sums(0))
    models = {}

    def compile_with(remat: str):
        cfg = with_remat(config, remat)
        models[remat] = build_models(cfg, has_mask_token)
        step = jit_loop_step(cfg, make_train_step(cfg, models[remat], labels, tx, total_steps), mesh)
        return step.lower(state, batch, sums).compile(compiler_options)

    devices = mesh.devices.size
    prefetched = PREFETCH_BATCHES * sum(math.prod(a.shape) * a.dtype.itemsize for a in batch.values()) // devices
    result = memory_fit.fit(compile_with, config.model.remat, limit, extra=prefetched)
    return result, models[result.tried[-1][0]]


def build_training(config, total_steps: int, student: dict, teacher: dict):
    """(models, optimizer labels, optimizer, initial TrainState) around initial student/teacher params."""
    models = build_models(config, has_mask_token="mask_token" in student["backbone"])
    depth = len(student["backbone"]["blocks"])
    labels = optim.param_labels(
        student,
        exclude_norm_bias=config.optim.exclude_norm_bias,
        trainable_blocks=optim.parse_trainable_blocks(config.optim.trainable_blocks, depth),
    )
    tx = optim.make_optimizer(config.optim, labels, total_steps)
    lcfg = config.loss
    queue = queue_lib.init(len(lcfg.crops_for_assign), lcfg.queue_length, config.head.out_dim) if lcfg.use_queue else {}

    def make_state(student, teacher):
        return ts.create(student, teacher if lcfg.use_teacher else {}, tx.init(student), queue, config.seed)

    abstract = isinstance(jax.tree.leaves(student)[0], jax.ShapeDtypeStruct)  # to restore into: shapes only
    state = jax.eval_shape(make_state, student, teacher) if abstract else make_state(student, teacher)
    return models, labels, tx, state


# --------------------------------------------------------------------------- export


def export_backbones(config, models: ts.Models, state: ts.TrainState, folder: str | os.PathLike) -> list[str]:
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
    layout = "timm" if config.model.arch.endswith("_dino") else "dinov2"
    parts = {"student": (models.student_backbone, state.student)}
    if config.loss.use_teacher:
        parts["teacher"] = (models.teacher_backbone, state.teacher)
    written = []
    for name, (backbone_def, params) in parts.items():
        params = distributed.host_copy(params)
        backbone, head = nnx.merge(backbone_def, params["backbone"]), nnx.merge(models.head, params["head"])
        written.append(str(save_backbone(backbone, os.path.join(folder, name), head=head)))
        path = os.path.join(folder, f"{name}_{layout}{suffix}")
        written.append(str(export_file(backbone.config, flatten_params(ts.to_pure(params["backbone"])), layout, path)))
    return written


# --------------------------------------------------------------------------- the loop


class _StoppedBeforeTheLoop(BaseException):
    """SIGTERM/SIGINT during setup (a BaseException, as KeyboardInterrupt: no `except Exception` takes it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _StopFlag:
    """SIGTERM (and SIGINT). Once the loop runs (`looping`), a signal sets `signum` and the loop saves a
    checkpoint at the next step boundary and returns; before, during setup, there is nothing to save yet and
    the signal stops the run at once (`_StoppedBeforeTheLoop`)."""

    def __init__(self):
        self.signum = None
        self.looping = False
        self._previous = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum
        if not self.looping:
            raise _StoppedBeforeTheLoop(signum)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _device_part(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: batch[k] for k in DEVICE_KEYS if k in batch}


@true_float32  # fp32 runs are fp32 on GPUs too (JAX's default there is TF32); bf16 is config.model.dtype
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, **options) -> dict[str, Any]:
    """Run (or resume) training in `workdir` (see `_train` for the options); returns the last logged metrics,
    the step reached and `stopped_by_signal` (the signal number when SIGTERM/SIGINT stopped it early, else
    None). A signal before the first step stops at once, with one line saying that nothing was saved."""
    stop = _StopFlag()
    stop.install()
    try:
        return _train(config, workdir, stop, **options)
    except _StoppedBeforeTheLoop as stopped:
        log.warning(
            "signal %d before the first step: stopped, nothing was saved; rerun the same command to start",
            stopped.signum,
        )
        return {"step": None, "total_steps": None, "state": None, "stopped_by_signal": stopped.signum}
    finally:
        stop.restore()


def _train(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    stop: _StopFlag,
    *,
    devices=None,
    stop_after: int | None = None,
    allow_config_change: bool = False,
    make_monitor: Callable[[ml_collections.ConfigDict, str, int], Any] | None = None,
) -> dict[str, Any]:
    """The run of `train_and_evaluate`; `stop`: its signal flag, set to `looping` as the loop starts.

    devices: the devices of the mesh (default all); stop_after: stop (with a checkpoint) once this many
    steps are done, as a pre-empted job would (tests of exact resume); allow_config_change: resume a
    checkpoint under a config that changes the computation (see neco_jax.run_record); make_monitor: builds
    the evaluation of `config.eval` from (config, workdir, steps per epoch), i.e. evaluation.monitor's (main.py
    passes it: this package does not import the evaluation package), needed when config.eval.every_epochs > 0.
    """
    workdir = os.fspath(workdir)
    check_config(config)
    if make_monitor is None and config.eval.every_epochs:
        raise ConfigError(
            f"config.eval.every_epochs={config.eval.every_epochs} needs an evaluation monitor: train with main.py "
            "(or pass make_monitor=evaluation.monitor.make_monitor to train_and_evaluate)"
        )
    distributed.initialize(config)  # before anything touches a device
    distributed.check_same_config(config, workdir)
    run_record.prepare_workdir(workdir)

    # ---- mesh
    mesh = sharding.make_mesh(devices)
    global_batch = config.optim.batch_size
    sharding.check_batch_size(global_batch, mesh)
    log.info(
        "mesh: %d devices (%s), %d processes; global batch %d",
        mesh.devices.size,
        mesh.devices.flat[0].platform,
        jax.process_count(),
        global_batch,
    )

    # ---- input
    loader = make_train_loader(
        config, batch_size=global_batch // jax.process_count(), seed=config.seed, worker_count=config.data.num_workers
    )
    total_steps = config.optim.total_steps or config.optim.num_epochs * loader.steps_per_epoch
    log.info(
        "data: %d images, %d steps per epoch; training %d steps",
        loader.num_records,
        loader.steps_per_epoch,
        total_steps,
    )
    monitor = make_monitor(config, workdir, loader.steps_per_epoch) if make_monitor else None

    # ---- restore or init
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
    latest = checkpointer.latest_step()
    if latest is not None:  # resume: shapes and dtypes only (nothing allocated), values from the checkpoint
        run_record.check_resume(workdir, config, allow_change=allow_config_change)
        student, teacher = jax.eval_shape(lambda: random_params(config, config.seed))
    else:
        student, teacher, init_desc = initial_params(config)
    models, labels, tx, state = build_training(config, total_steps, student, teacher)
    repl = sharding.replicated(mesh)
    del student, teacher
    if latest is not None:  # straight into the mesh's replicated layout, on any number of processes
        latest, state, data_state = checkpointer.restore_newest_intact(ckpt_lib.abstract_like(state, repl))
        distributed.set_loader_state(loader, data_state)
        init_desc = f"resumed from {checkpointer.directory}/{latest}"
    else:
        state = jax.device_put(state, repl)
    log.info("init: %s", init_desc)
    log.info("optimizer groups (tensors): %s", optim.group_counts(labels))
    if jax.process_index() == 0:
        mw.log_parameter_overview(ts.to_pure(distributed.host_copy(state.student)), "student")

    # ---- the step, compiled ahead and checked against the devices' memory (never an OOM inside the first step)
    cap = nonfinite_cap(config)
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    limit = memory_fit.device_limit(local)
    if limit is None:
        log.debug("the %s backend reports no memory limit: the step's memory is not checked", local[0].platform)
    fit, models = compile_loop_step(
        config, total_steps, state, labels, tx, mesh, limit, has_mask_token="mask_token" in state.student["backbone"]
    )
    if not fit.fits:
        raise StepMemoryError(
            memory_fit.no_fit_message(
                fit,
                limit,
                f"a {local[0].device_kind}",
                dtype=config.model.dtype,
                batch_size=global_batch,
                devices=mesh.devices.size,
                remat=config.model.remat,
            )
        )
    log.info(
        "step: model.remat=%s (%s), %.2f GiB per device (%.2f GiB temporaries)%s",
        fit.remat,
        "chosen" if config.model.remat == "auto" else "as set",
        fit.memory.peak / memory_fit.GIB,
        fit.memory.temporaries / memory_fit.GIB,
        f" of {limit / memory_fit.GIB:.1f} GiB" if limit else "",
    )
    train_step = fit.compiled

    # ---- loop
    writer = mw.MetricsWriter(workdir)
    start = int(distributed.host_copy(state.step))
    end = total_steps if stop_after is None else min(total_steps, stop_after)
    clock = mw.StepClock(total_steps, global_batch, start)
    stop.looping = True  # from here a signal is a checkpoint at the next step boundary
    feed = step_feed.prefetch(loader, lambda b: sharding.global_batch(_device_part(b), mesh), PREFETCH_BATCHES)
    # the sums placed as the step returns them (uncommitted arrays would compile the step a second time)
    sums, window, last = step_feed.empty_sums(0, repl), step_feed.LogWindow(), {}

    def describe(loss, grad_norm) -> str:
        return (
            f"the loss ({loss}) or the gradient norm ({grad_norm}) is not finite"
            if not np.isfinite(loss) or not np.isfinite(grad_norm)
            else f"the update (loss {loss}, gradient norm {grad_norm}) made the weights, teacher, optimizer "
            "state or queue non-finite"
        )

    def settle(step_no: int, metrics, sums, skipped: int, log_due: bool) -> int:
        """The host's only round trip: fetch the sums since the last fetch and this step's metrics; the
        non-finite checks, and the log line when due. Returns the run of non-finite steps it ends with."""
        nonlocal last
        sums, metrics = distributed.host_copy((sums, metrics))
        if sums["alarm_step"] >= 0:
            skip = config.optim.on_nonfinite == "skip"
            raise NonFiniteError(
                f"step {sums['alarm_step']}: {f'{cap} non-finite steps in a row, ' if skip else ''}"
                f"{describe(sums['alarm_loss'], sums['alarm_grad_norm'])}; the update was not applied (found at step "
                f"{step_no}, where metrics are fetched) and the last good checkpoint in {checkpointer.directory} "
                "is kept. Lower the learning rate or enable "
                "optim.grad_clip_norm"
                + (
                    f" (optim.max_consecutive_skips={cap} sets how many are skipped)"
                    if skip
                    else ", or set optim.on_nonfinite=skip"
                )
            )
        if sums["nonfinite"]:
            log.warning(
                "steps up to %d: %d non-finite, the first at step %d: %s; updates skipped (%d so far)",
                step_no,
                sums["nonfinite"],
                sums["first_nonfinite_step"],
                describe(sums["first_nonfinite_loss"], sums["first_nonfinite_grad_norm"]),
                metrics["nonfinite_steps"],
            )
        window.add(sums)
        run = int(sums["run"])
        if log_due:
            timing = clock.report(step_no)
            row = {
                **{k: v for k, v in metrics.items() if k != "finite"},
                **window.means(),
                "loss_last": float(metrics["loss"]),
                "skipped_images": distributed.total(skipped)[0],
                **timing,
            }
            writer.write(step_no, row)
            log.info(mw.progress_line(step_no, total_steps, row))
            last = row
        return run

    try:
        for step_no in range(start + 1, end + 1):
            fed = next(feed)
            clock.data_ready()
            state, metrics, sums = train_step(state, fed.batch, sums)
            step_feed.release(fed.batch)
            if step_no == start + 1 and jax.process_index() == 0:  # the run has started: record it
                run_record.record_start(workdir, config, start)
                mw.set_aside_rows_after(workdir, start)
            stopping = distributed.agreed_stop(stop.signum, step_no, config.stop_check_every_steps, last=step_no == end)
            if stopping is not None:  # every process stops at the same step, whichever of them got the signal
                stop.signum = stopping
            log_due = step_no % config.log_every_steps == 0 or step_no == end
            ckpt_due = step_no % config.checkpoint_every_steps == 0 or step_no == end or stopping is not None
            if log_due or ckpt_due:  # never checkpoint a step whose loss was not checked
                # the loader's bad-file count (it continues across resumes) as of this step's batch
                run = settle(step_no, metrics, sums, fed.data_state["bad_files"], log_due)
                sums = step_feed.empty_sums(run, repl)
            if ckpt_due:
                checkpointer.save(step_no, state, distributed.global_loader_state(fed.data_state))
            clock.step_done()
            # An epoch ended: evaluate the teacher (not when stopping: the scheduler's grace period is for the save).
            if monitor is not None and stopping is None and monitor.due(step_no):
                row = monitor.run(
                    nnx.merge(
                        models.teacher_backbone, distributed.host_copy((state.teacher or state.student)["backbone"])
                    ),
                    step_no,
                )
                writer.write(step_no, row)
                log.info(
                    "epoch %d: eval mIoU %.2f %% (%.0f s)", row["eval_epoch"], 100 * row["eval_miou"], row["eval_s"]
                )
                clock.exclude(row["eval_s"])
            if stopping is not None:
                log.warning("signal %d: checkpoint of step %d saved, stopping", stop.signum, step_no)
                break
    finally:
        stop.restore()  # a signal during the export or the plot is the default again: the run is done
        feed.close()
        loader.close()
        checkpointer.close()
        writer.close()

    done = int(distributed.host_copy(state.step))
    if jax.process_index() == 0 and done > 0:
        log.info("curves: %s", curves.write_plot(workdir))
    if done >= total_steps and config.export_at_end and jax.process_index() == 0:
        files = export_backbones(config, models, state, os.path.join(workdir, "export"))
        log.info("exported: %s", ", ".join(files))
    return {**last, "step": done, "total_steps": total_steps, "state": state, "stopped_by_signal": stop.signum}
