"""The training state as one pytree of NNX states, the graph definitions it is merged with, and its plain
(checkpoint) layout.

The jitted step is a pure function of `TrainState` (donated, replicated): the student and teacher as
{"backbone": nnx.State, "head": nnx.State}, the optimizer state, the reference queue, the step, the RNG key
and the count of skipped (non-finite) steps. `nnx.split` gives each module's graph definition (`Models`) and
state; the step rebuilds the modules with `nnx.merge(graphdef, state)`, so the state holds arrays only and the
optimizer, EMA and sharding treat it as any pytree.

Checkpoints and weight files hold every `nnx.State` as the plain nested dict of its arrays (`to_pure`, with
`nnx.to_pure_dict`; `from_pure` puts them back): these two functions are the one place where the in-memory
layout of the parameters meets the stored one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from neco_jax import memory_fit
from neco_jax.models import ViTConfig, get_arch
from neco_jax.settings import ModelSettings


def split(module: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
    """(graph definition, parameter state); `nnx.split` refuses a module holding anything but nnx.Param, which
    the train state could not carry."""
    return nnx.split(module, nnx.Param)


def _is_state(x: Any) -> bool:
    return isinstance(x, nnx.State)


def to_pure(tree: Any) -> Any:
    """`tree` with every nnx.State in it as the plain nested dict of its arrays (the stored layout)."""
    return jax.tree.map(lambda x: nnx.to_pure_dict(x) if _is_state(x) else x, tree, is_leaf=_is_state)


def from_pure(template: Any, pure: Any) -> Any:
    """`template` (a tree holding nnx.States, of arrays or shapes) with the values of `pure`, a tree laid out as
    `to_pure(template)`; integer keys may come as strings, as orbax stores them."""

    def fill(t: Any, p: Any) -> Any:
        if not _is_state(t):
            return p
        state = jax.tree.map(lambda x: x, t)  # a new State: replace_by_pure_dict writes into it
        nnx.replace_by_pure_dict(state, p)
        return state

    return jax.tree.map(fill, template, pure, is_leaf=_is_state)


def vit_configs(model: ModelSettings, has_mask_token: bool | None = None) -> tuple[ViTConfig, ViTConfig]:
    """(student, teacher) ViTConfigs of the model settings: the named arch with the settings' ViTConfig fields
    (arch_overrides, registers, dtype, attention, remat) and drop path (none in the teacher)."""
    overrides = {
        **model.arch_overrides,
        "num_register_tokens": model.num_register_tokens,
        "dtype": model.dtype,
        "attention": model.attention,
    }
    if has_mask_token is not None:
        overrides["has_mask_token"] = has_mask_token
    # "auto" is resolved by the trainer (neco_jax.step.compile_loop_step) before it builds the step; built as it
    # is, the model is the first choice "auto" tries.
    overrides.update(memory_fit.REMAT_FIELDS["none" if model.remat == "auto" else model.remat])
    student = get_arch(model.arch, drop_path_rate=model.drop_path_rate, **overrides)
    teacher = get_arch(model.arch, drop_path_rate=0.0, **overrides)
    return student, teacher


@dataclasses.dataclass(frozen=True)
class Models:
    """Graph definitions of the four modules: student and teacher backbones (they differ in drop path) and the
    head (the same for both)."""

    student_backbone: nnx.GraphDef
    teacher_backbone: nnx.GraphDef
    head: nnx.GraphDef
    patch_size: int


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken (the original's global_step)
    student: dict  # {"backbone": nnx.State, "head": nnx.State}
    teacher: dict  # same structure; the EMA of the student (an empty dict when loss.use_teacher is False)
    opt_state: Any
    queue: Any  # reference queue of teacher vectors (see neco_jax.queue), or an empty dict
    rng: jax.Array  # uint32 raw PRNG key (2,), split once per step
    skipped: jax.Array  # int32 scalar: steps whose update was dropped because the loss or grads were non-finite


def create(student: dict, teacher: dict, opt_state: Any, queue: Any, seed: int) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        student=student,
        teacher=teacher,
        opt_state=opt_state,
        queue=queue,
        rng=jax.random.PRNGKey(seed),
        skipped=jnp.zeros((), jnp.int32),
    )
