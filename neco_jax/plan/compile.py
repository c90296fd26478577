"""Compile the trainer's real step (and an evaluation job's feature forward) for a device this machine lacks.

JAX's deviceless ahead-of-time compilation: `jax.experimental.topologies.get_topology_desc` gives the target's
devices without a runtime, the program is lowered with abstract inputs (shapes only: nothing is allocated, no
weights are read) and compiled by the target's own compiler (the CUDA plugin's XLA GPU compiler, libtpu's TPU
compiler); XLA's buffer assignment (`memory_analysis()`) then says what one device needs. No kernel is timed:
GEMM algorithms and fusion tilings are XLA's defaults instead of the autotuned ones, and Triton GEMMs are off
(they would need autotuning), so the memory of a real run can differ slightly (workspace sizes) and no step
time is measured.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import topologies

from neco_jax import memory_fit, sharding, weights
from neco_jax import step as step_lib
from neco_jax import train_state as ts
from neco_jax.flop_count import matmul_flops
from neco_jax.models import VisionTransformer
from neco_jax.models import attention as attention_lib
from neco_jax.models.feature_forward import feature_forward
from neco_jax.plan import hlo_traffic
from neco_jax.plan.targets import JAX_GPU_MEMORY_FRACTION, Target, check_installed
from neco_jax.precision import true_float32
from neco_jax.settings import TrainSettings, from_config

GPU_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}
NOT_AUTOTUNED = (
    "kernels are not autotuned (no device to time them on): XLA's default GEMM algorithms and fusion tilings, Triton "
    "GEMMs off; memory is XLA's buffer assignment for this program, a real run may differ slightly (workspaces)"
)


def devices_of(target: Target) -> list[Any]:
    check_installed(target)
    if target.platform == "cuda":
        topology = topologies.get_topology_desc(platform="cuda", target_config=target.spec(), topology=target.topology)
    else:
        # Compiling needs no chip: let libtpu load beside other processes that compile (it locks otherwise).
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        topology = topologies.get_topology_desc(topology_name=target.topology, platform="tpu")
    return list(topology.devices)


def memory_limit(target: Target, fraction: float | None) -> tuple[int, float]:
    """(bytes a step may use per device, the share of the device's memory that is): a GPU's as JAX's allocator
    gets it (`fraction`, default JAX's 0.75), a TPU chip's whole HBM."""
    share = (JAX_GPU_MEMORY_FRACTION if fraction is None else fraction) if target.platform == "cuda" else 1.0
    return int(target.device_memory() * share), share


def _compiler_options(target: Target) -> dict | None:
    return GPU_COMPILER_OPTIONS if target.platform == "cuda" else None


def _program_figures(compiled) -> dict[str, Any]:
    """HLO traffic, and XLA's FLOPs and step-time estimate where its backend gives them (TPU; None on GPUs);
    all None for a program the compiler refused as too big."""
    if compiled is None:
        return {"hlo_traffic_bytes": None, "xla_flops": None, "xla_estimated_seconds": None}
    analysis = compiled.cost_analysis()
    analysis = (analysis[0] if analysis else None) if isinstance(analysis, list) else analysis
    seconds = (analysis or {}).get("optimal_seconds")
    return {
        "hlo_traffic_bytes": hlo_traffic.traffic_bytes(compiled.as_text()),
        "xla_flops": (analysis or {}).get("flops"),
        "xla_estimated_seconds": seconds if seconds is not None and seconds > 0 else None,
    }


@true_float32  # traced as the trainer traces it: float32 matmuls at full precision
def plan_training(config, target: Target, *, fraction: float | None = None) -> dict[str, Any]:
    """The training step of `config` compiled for `target`: memory per device for each rematerialisation tried
    (config.model.remat, "auto" as the trainer resolves it against the target's memory), whether it fits, and
    the chosen program's FLOPs, traffic and estimated time."""
    devices = devices_of(target)
    mesh = sharding.make_mesh(devices)
    sharding.check_batch_size(config.optim.batch_size, mesh)
    limit, share = memory_limit(target, fraction)
    settings = from_config(config)
    total_steps = config.optim.total_steps or 1000  # only the schedules' horizon: the same program
    student, teacher = jax.eval_shape(lambda: weights.random_params(settings, settings.run.seed))
    training = step_lib.build_training(settings, total_steps, student, teacher)
    start = time.perf_counter()
    with attention_lib.compiling_for(target.attention_platform):
        options = _compiler_options(target)
        result, models = step_lib.compile_loop_step(settings, training, mesh, limit, options)
        chosen = step_lib.with_remat(settings, result.remat or result.tried[-1][0])
        step_fn = step_lib.make_train_step(chosen, models, training.labels)
        flops = matmul_flops(step_fn, training.state, step_lib.batch_spec(settings, mesh), training.schedules)
        attention = _attention_used(settings, models)
    return {
        "job": "training step",
        **_device_fields(target, devices, limit, share),
        "batch_size": config.optim.batch_size,
        "images_per_device": config.optim.batch_size // len(devices),
        "dtype": config.model.dtype,
        "attention": attention,
        "remat": config.model.remat,
        "remat_chosen": result.remat,
        "tried": [{"remat": c, **m.to_dict(), "fits": m.peak <= limit} for c, m in result.tried],
        "memory": result.memory.to_dict(),
        "fits": result.fits,
        "matmul_flops": flops,
        **_program_figures(result.compiled),
        "compile_s": time.perf_counter() - start,
    }


def _attention_used(settings: TrainSettings, models: ts.Models) -> str:
    """What model.attention runs as for the global crops (under the active compiling_for)."""
    vit = ts.vit_configs(settings.model)[0]
    tokens = 1 + vit.num_register_tokens + (settings.views.size_crops[0] // models.patch_size) ** 2
    return attention_lib.resolve(vit.attention, vit.compute_dtype, tokens, vit.attention_chunk)


def _device_fields(target: Target, devices: list, limit: int, share: float) -> dict[str, Any]:
    return {
        "target": target.name,
        "platform": target.platform,
        "device_kind": devices[0].device_kind,
        "devices": len(devices),
        "device_memory_bytes": target.device_memory(),
        "limit_bytes": limit,
        "memory_share": share,
    }


@true_float32
def plan_features(config, eval_config, target: Target, *, fraction: float | None = None) -> dict[str, Any]:
    """An evaluation job's feature forward (`eval_config`: its image_size, batch_size, dtype) on the teacher
    backbone of the training `config`, compiled for `target`."""
    devices = devices_of(target)
    mesh = sharding.make_mesh(devices)
    limit, share = memory_limit(target, fraction)
    vit = dataclasses.replace(ts.vit_configs(from_config(config).model)[1], dtype=eval_config.dtype)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: VisionTransformer(vit, rngs=nnx.Rngs(0))))
    batch = -(-eval_config.batch_size // len(devices)) * len(devices)  # padded to the devices, as the job pads
    size = eval_config.image_size
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    forward = jax.jit(
        feature_forward(graphdef, vit.patch_size),
        in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
        out_shardings=sharding.batch_sharding(mesh),
    )
    start = time.perf_counter()
    with attention_lib.compiling_for(target.attention_platform):
        compiled = forward.lower(state, images).compile(_compiler_options(target))
    memory = memory_fit.StepMemory.of(compiled)
    return {
        "job": "feature forward",
        **_device_fields(target, devices, limit, share),
        "batch_size": batch,
        "images_per_device": batch // len(devices),
        "image_size": size,
        "dtype": eval_config.dtype,
        "memory": memory.to_dict(),
        "fits": memory.peak <= limit,
        "matmul_flops": matmul_flops(forward, state, images),
        **_program_figures(compiled),
        "compile_s": time.perf_counter() - start,
    }
