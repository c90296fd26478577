"""The training state as one pytree of plain arrays, and the NNX split/merge at its edges.

The jitted step is a pure function of `TrainState` (donated, replicated): the student and teacher
(backbone + head) as nested dicts of arrays, the optimizer state, the reference queue, the step, the
RNG key and the count of skipped (non-finite) steps. Modules are rebuilt from their `ModuleDef` (graph
definition + the abstract parameter list) inside the step, so the state itself holds no Python objects
and checkpoints, EMA and sharding stay plain JAX.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class ModuleDef:
    """What `merge` needs to rebuild an NNX module from a nested dict of its parameters."""

    graphdef: Any
    abstract: tuple  # ((path, abstract nnx.Param), ...) in nnx.to_flat_state order

    def merge(self, params: dict) -> nnx.Module:
        flat = []
        for path, var in self.abstract:
            value = params
            for key in path:
                value = value[key]
            flat.append((path, var.replace(value)))
        return nnx.merge(self.graphdef, nnx.from_flat_state(flat))


def split(module: nnx.Module) -> tuple[ModuleDef, dict]:
    """(ModuleDef, nested dict of parameter arrays). Modules here hold nothing but nnx.Param state."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"{type(module).__name__} holds non-parameter state {rest}; the train state cannot carry it")
    abstract = tuple(
        (path, var.replace(jax.ShapeDtypeStruct(var.shape, var.dtype))) for path, var in nnx.to_flat_state(params)
    )
    return ModuleDef(graphdef, abstract), nnx.to_pure_dict(params)


@dataclasses.dataclass(frozen=True)
class Models:
    """Static halves of the four modules: student and teacher backbones (they differ in drop path) and heads."""

    student_backbone: ModuleDef
    teacher_backbone: ModuleDef
    head: ModuleDef
    patch_size: int


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken (the original's global_step)
    student: dict  # {"backbone": params, "head": params}
    teacher: dict  # same structure; the EMA of the student (unused when loss.use_teacher is False)
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
