"""The NeCo train step: forward passes, loss, gradients, EMA teacher and AdamW update, as one jitted program.

The step (`make_train_step`) is a pure function of (TrainState, global batch, schedules): the batch is sharded
along the mesh's "data" axis, the state replicated and donated; every mean is over the global batch, so the result
does not depend on the number of devices. The schedules (learning rates, weight decay, EMA momentum: `schedules`)
are arguments rather than constants of the program, so runs that differ only in those values or in their length
share one compiled step. Order inside a step, as in the original: forward passes and loss (which
also pushes this step's teacher vectors into the queue) -> gradients -> EMA of the teacher towards the
*pre-update* student (the original's one-step lag, see ema.py) -> AdamW update. The loop runs it with the
metric sums carried (`jit_loop_step`), so that the host fetches them only at log and checkpoint steps.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from input_pipeline import augment
from input_pipeline.views import view_shapes
from neco_jax import ema, memory_fit, nonfinite, optim, sharding
from neco_jax import loss as loss_lib
from neco_jax import queue as queue_lib
from neco_jax import train_state as ts
from neco_jax.device_feed import PREFETCH_BATCHES
from neco_jax.fg_mask import attention_fg_mask
from neco_jax.settings import TrainSettings
from neco_jax.weights import build_models

# The batch keys the step consumes (the loader's `index` and `skipped` stay on the host; the colour parameters
# come only with data.augment_on="device").
DEVICE_KEYS = ("global_crops", "local_crops", "boxes_gc", "boxes_all", "global_colour", "local_colour")


def device_part(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays of a loader batch that the step reads."""
    return {k: batch[k] for k in DEVICE_KEYS if k in batch}


class Training(NamedTuple):
    """What the step is built from: the graph definitions, each parameter's optimizer group, the run's schedules,
    and the train state (arrays, or shapes only: what a checkpoint restores into, what a step is compiled for)."""

    models: ts.Models
    labels: Any
    schedules: dict[str, optim.Cosine]
    state: ts.TrainState


def schedules(settings: TrainSettings, total_steps: int) -> dict[str, optim.Cosine]:
    """The step's schedules over a run of `total_steps`: the optimizer's (`optim.schedules`) and the EMA rate
    `1 - momentum` (`ema.ema_rate_schedule`)."""
    rate = ema.ema_rate_schedule(settings.ema.momentum, settings.ema.momentum_end, total_steps)
    return {**optim.schedules(settings.optim, total_steps), "ema_rate": rate}


def build_training(settings: TrainSettings, total_steps: int, student: dict, teacher: dict) -> Training:
    """The models, optimizer groups, schedules and initial TrainState around initial student/teacher params; with
    abstract params (shapes only) the state is abstract too."""
    models = build_models(settings, has_mask_token="mask_token" in student["backbone"])
    depth = len(student["backbone"]["blocks"])
    labels = optim.param_labels(
        student,
        exclude_norm_bias=settings.optim.exclude_norm_bias,
        trainable_blocks=optim.parse_trainable_blocks(settings.optim.trainable_blocks, depth),
    )
    sched = schedules(settings, total_steps)
    tx = optim.make_optimizer(settings.optim, labels, sched)
    loss = settings.loss
    queue = (
        queue_lib.init(settings.views.nmb_samples[0], loss.queue_length, settings.head.out_dim)
        if loss.use_queue
        else {}
    )

    def make_state(student, teacher):
        return ts.create(student, teacher if loss.use_teacher else {}, tx.init(student), queue, settings.run.seed)

    abstract = isinstance(jax.tree.leaves(student)[0], jax.ShapeDtypeStruct)
    state = jax.eval_shape(make_state, student, teacher) if abstract else make_state(student, teacher)
    return Training(models, labels, sched, state)


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


def make_loss_fn(settings: TrainSettings, models: ts.Models, labels: Any) -> Callable:
    """`loss_fn(student, teacher, queue, batch, key) -> (loss, (new_queue, aux))`, differentiable in `student`;
    `queue` is {} without one."""
    use_teacher, need_attn = settings.loss.use_teacher, settings.loss.loss_mask != "all"
    frozen = jax.tree.map(lambda lab: lab == optim.FROZEN, labels)

    def loss_fn(student, teacher, queue, batch, key):
        k_glob, k_loc, k_self, k_loss = jax.random.split(key, 4)
        # Frozen params get no gradient, and XLA skips computing their weight gradients.
        student = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, student, frozen)
        s_glob, _ = _forward(models.student_backbone, models.head, student, batch["global_crops"], key=k_glob)
        s_loc, _ = _forward(models.student_backbone, models.head, student, batch["local_crops"], key=k_loc)
        # The targets: the teacher's pass, or in the original's no-teacher ablation a second student pass (drop
        # path on), through which the gradient flows.
        if use_teacher:
            target_def, target, target_key = models.teacher_backbone, teacher, None
        else:
            target_def, target, target_key = models.student_backbone, student, k_self
        t_glob, attn = _forward(
            target_def, models.head, target, batch["global_crops"], key=target_key, return_attention=need_attn
        )
        if use_teacher:
            t_glob = jax.lax.stop_gradient(t_glob)
        fg = attention_fg_mask(jax.lax.stop_gradient(attn), t_glob.shape[2:4]) if need_attn else None
        loss, aux, new_queue = loss_lib.neco_loss(
            (s_glob, s_loc, t_glob),
            (batch["boxes_gc"], batch["boxes_all"]),
            queue or None,
            k_loss,
            settings.loss,
            patch_size=models.patch_size,
            fg_mask=fg,
        )
        return loss, (queue if new_queue is None else new_queue, aux)

    return loss_fn


def make_train_step(settings: TrainSettings, models: ts.Models, labels: Any) -> Callable:
    """The pure step `(state, batch, schedules) -> (state, metrics)` (`schedules` as made by `schedules`); the loop
    runs it inside `jit_loop_step`. A batch of uint8 crops (data.augment_on="device") gets its colour augmentation and
    normalisation first, inside the step."""
    use_teacher = settings.loss.use_teacher
    loss_fn = make_loss_fn(settings, models, labels)
    colour = functools.partial(augment.apply_batch, views=settings.views)

    def step(state: ts.TrainState, batch: dict, sched: dict[str, optim.Cosine]) -> tuple[ts.TrainState, dict]:
        tx = optim.make_optimizer(settings.optim, labels, sched)
        batch = colour(batch)
        key, rng = jax.random.split(state.rng)
        (loss, (queue, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.student, state.teacher, state.queue, batch, key
        )
        grad_norm = optim.trained_grad_norm(grads, labels)
        updates, opt_state = tx.update(grads, state.opt_state, state.student)
        student = optax.apply_updates(state.student, updates)
        rate = sched["ema_rate"](state.step)
        teacher = ema.ema_update(state.teacher, state.student, rate) if use_teacher else state.teacher
        new = (student, teacher, opt_state, queue)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & nonfinite.all_finite(new)
        student, teacher, opt_state, queue = nonfinite.keep_finite(
            finite, new, (state.student, state.teacher, state.opt_state, state.queue)
        )
        new_state = ts.TrainState(
            step=state.step + 1,
            student=student,
            teacher=teacher,
            opt_state=opt_state,
            queue=queue,
            rng=rng,
            skipped=state.skipped + (~finite).astype(jnp.int32),
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "finite": finite,
            "momentum": 1.0 - rate,
            "nonfinite_steps": new_state.skipped,
            **optim.hyperparams(sched, state.step),
            **aux,
        }
        return new_state, metrics

    return step


def empty_sums(limit: int, run: int = 0, placement: jax.sharding.Sharding | None = None) -> dict[str, Any]:
    """What the loop's step sums on the device between two fetches: the steps, their loss and gradient norm,
    and the non-finite count (`nonfinite.count`, stopping at `limit` in a row, `nonfinite.cap`; `run` continues
    the last one's run). With `placement`, made by a jitted program with that output sharding, as the step returns
    them (on several processes `jax.device_put` would compare the NaN entries between processes, and NaN != NaN)."""
    if placement is not None:
        return _empty_sums_program(placement)(limit, run)
    sums = {"steps": np.int32(0), "loss_sum": np.float32(0), "grad_norm_sum": np.float32(0)}
    # one buffer each: the step donates them, and a buffer cannot be donated twice in one call
    return {k: jnp.array(v) for k, v in {**sums, **nonfinite.empty_counts(limit, run)}.items()}


@functools.cache
def _empty_sums_program(placement: jax.sharding.Sharding) -> Callable:
    """`empty_sums` jitted with that output sharding, once per sharding (compiled once per `limit` and `run`)."""
    return jax.jit(empty_sums, static_argnums=(0, 1), out_shardings=placement)


def with_sums(step_fn: Callable) -> Callable:
    """The step `(state, batch, schedules) -> (state, metrics)` as `(state, batch, sums, schedules) -> (state,
    metrics, sums)`: the sums of `empty_sums` updated in the same program, so each step is one dispatch."""

    def step(state, batch, sums, sched):
        state, metrics = step_fn(state, batch, sched)
        added = {
            "steps": sums["steps"] + 1,
            "loss_sum": sums["loss_sum"] + metrics["loss"].astype(jnp.float32),
            "grad_norm_sum": sums["grad_norm_sum"] + metrics["grad_norm"].astype(jnp.float32),
        }
        return state, metrics, {**added, **nonfinite.count(sums, metrics, state.step)}

    return step


def jit_loop_step(step_fn: Callable, mesh) -> Callable:
    """The training loop's program: `step_fn` with the metric sums carried (`(state, batch, sums, schedules) ->
    (state, metrics, sums)`), jitted over the mesh: the batch sharded along "data", everything else replicated, the
    state and the sums donated. The bench and the tests that time or probe the loop's step build it here too, so
    they run (and the compilation cache serves) the very same program."""
    repl = sharding.replicated(mesh)
    return jax.jit(
        with_sums(step_fn),
        in_shardings=(repl, sharding.batch_sharding(mesh), repl, repl),
        out_shardings=(repl, repl, repl),
        donate_argnums=(0, 2),
    )


def batch_spec(settings: TrainSettings, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the step takes (its DEVICE_KEYS) as shapes sharded along "data": what the step is
    compiled for before any image is read."""
    b, data = settings.optim.batch_size, sharding.batch_sharding(mesh)
    shapes = view_shapes(settings.views)
    return {k: jax.ShapeDtypeStruct((b, *shape), dtype, sharding=data) for k, (shape, dtype) in shapes.items()}


def with_remat(settings: TrainSettings, remat: str) -> TrainSettings:
    """`settings` with model.remat set (one of memory_fit.REMAT_VALUES)."""
    return dataclasses.replace(settings, model=dataclasses.replace(settings.model, remat=remat))


def lower_loop_step(settings: TrainSettings, training: Training, mesh) -> tuple[jax.stages.Lowered, ts.Models]:
    """The loop's program (`jit_loop_step`) lowered for `training.state` (arrays or shapes), `batch_spec` and
    `training.schedules`, with `settings.model.remat` ("auto" builds its first choice, "none"); and the models it
    runs. Whatever compiles the loop's step lowers it here, so that equal settings give the very same program."""
    models = build_models(settings, "mask_token" in training.state.student["backbone"])
    program = jit_loop_step(make_train_step(settings, models, training.labels), mesh)
    sums = jax.eval_shape(lambda: empty_sums(nonfinite.cap(settings.optim)))
    return program.lower(training.state, batch_spec(settings, mesh), sums, training.schedules), models


def compile_loop_step(
    settings: TrainSettings, training: Training, mesh, limit: int | None, compiler_options: dict | None = None
) -> tuple[memory_fit.Fit, ts.Models]:
    """The loop's program (`lower_loop_step`) compiled ahead for each rematerialisation model.remat allows until one
    needs at most `limit` bytes per device (None: the first; see neco_jax.memory_fit). Returns the outcome and the
    models of the choice taken. The planner (neco_jax.plan) compiles the same for devices this machine lacks."""
    models = {}

    def compile_with(remat: str):
        lowered, models[remat] = lower_loop_step(with_remat(settings, remat), training, mesh)
        return lowered.compile(compiler_options) if compiler_options else _compile_reusing(lowered, mesh)

    per_batch = sum(math.prod(a.shape) * a.dtype.itemsize for a in batch_spec(settings, mesh).values())
    prefetched = PREFETCH_BATCHES * per_batch // mesh.devices.size
    result = memory_fit.fit(compile_with, settings.model.remat, limit, extra=prefetched)
    return result, models[result.tried[-1][0]]


_RECENT: dict[tuple[str, tuple[int, ...]], Any] = {}  # the last few loop programs compiled here, oldest first
_KEEP = 4


def _compile_reusing(lowered: jax.stages.Lowered, mesh) -> Any:
    """`lowered.compile()`, or the executable this process compiled for one of its last `_KEEP` runs when the program
    is the very same (StableHLO text and devices): repeated runs in one process (a notebook, a sweep, the tests)
    then skip loading it from the compilation cache again (1-3 s for the demo on a CPU)."""
    key = (hashlib.sha256(lowered.as_text().encode()).hexdigest(), tuple(d.id for d in mesh.devices.flat))
    compiled = _RECENT.pop(key, None)
    _RECENT[key] = compiled = lowered.compile() if compiled is None else compiled
    while len(_RECENT) > _KEEP:
        del _RECENT[next(iter(_RECENT))]
    return compiled
