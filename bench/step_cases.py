"""The training steps that bench/train_step.py times (and tests/test_bench.py, tests/test_gpu.py check): the
recipes' cases, each case's config, synthetic batches with the input pipeline's keys and shapes, and the trainer's
own state and loop program built on random-init weights."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, NamedTuple

import jax
import numpy as np

from configs import base
from input_pipeline.views import draw_colour_params
from neco_jax import memory_fit, nonfinite, sharding, weights
from neco_jax import step as step_lib
from neco_jax.settings import TrainSettings, from_config


@dataclasses.dataclass(frozen=True)
class Case:
    recipe: str  # configs/<recipe>.py
    size_crops: tuple[int, int]
    batch: int
    dtype: str
    remat: str = "none"  # config.model.remat; "auto" as the trainer resolves it against the device's memory
    attention: str = "auto"  # config.model.attention; "xla" is the plain path that keeps the N x N scores

    @property
    def name(self) -> str:
        short = {"float32": "fp32", "bfloat16": "bf16"}[self.dtype]
        recipe = self.recipe.replace("dinov2_", "")
        return (
            f"{recipe}_{self.size_crops[0]}_b{self.batch}_{short}"
            + {"none": "", "full": "_remat", "dots": "_dots", "auto": "_auto"}[self.remat]
            + ("" if self.attention == "auto" else f"_{self.attention}")
        )


def _cases(specs) -> dict[str, Case]:
    cases = [Case(*spec) for spec in specs]
    return {c.name: c for c in cases}


S518, S224 = (518, 98), (224, 98)
# Most important first: gpu_check.sh runs them in this order under a time budget. First each recipe's own default
# config (float32, model.remat and model.attention "auto"): what a user runs.
FULL = _cases(
    [
        ("dinov2_s14", S518, 64, "float32", "auto"),
        ("dinov2_b14", S518, 16, "float32", "auto"),
        ("dinov2_s14", S518, 64, "bfloat16", "auto"),
        ("dinov2_s14", S518, 64, "bfloat16", "full", "xla"),
        ("dinov2_s14", S518, 64, "bfloat16", "full"),
        ("dinov2_b14", S518, 16, "bfloat16", "auto"),
        ("dinov2_s14", S224, 64, "bfloat16"),
        ("dinov2_s14", S224, 64, "float32"),
        ("dinov2_s14", S518, 64, "float32", "full"),
        ("dinov2_b14", S518, 16, "bfloat16", "full"),
        ("dinov2_s14", S224, 64, "bfloat16", "full"),
        ("dinov2_s14", S224, 64, "float32", "full"),
        ("dinov2_b14", S518, 16, "float32", "full"),
    ]
)
SMALL = _cases(
    [
        ("demo", (56, 28), 4, "float32"),
        ("demo", (56, 28), 4, "float32", "none", "xla"),
        ("demo", (56, 28), 4, "float32", "none", "chunked"),
        ("demo", (56, 28), 4, "bfloat16"),
        ("demo", (56, 28), 4, "float32", "full"),
        ("demo", (56, 28), 4, "float32", "auto"),
        ("dinov2_s14", S518, 1, "float32", "full"),
        ("dinov2_s14", S518, 1, "float32"),
        ("dinov2_s14", S518, 1, "float32", "none", "xla"),
    ]
)  # the demo at its own batch (model.attention "auto", the plain "xla" path, "chunked"; its first case is the
# demo's loop program on one device, which tests/test_train.py compiles too), and the recipe's shapes at a CPU batch


def case_config(case: Case):
    """The recipe's ConfigDict with random init and the case's shapes, dtype and remat."""
    config = importlib.import_module(f"configs.{case.recipe}").get_config()
    return base.set_fields(
        config,
        {
            "model.init": "random",
            "data.size_crops": case.size_crops,
            "optim.batch_size": case.batch,
            "model.dtype": case.dtype,
            "model.remat": case.remat,
            "model.attention": case.attention,
            "optim.total_steps": 1000,
        },
    )


def synthetic_batch(config, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A batch with the input pipeline's keys, shapes and value ranges: random uint8 crops with colour
    parameters drawn as the workers draw them, and overlap boxes inside each crop's frame (a crop's overlap
    with itself is the whole crop)."""
    b = config.optim.batch_size
    (n_g, n_l), (s_g, s_l) = config.data.nmb_samples, config.data.size_crops
    views = n_g + n_l
    sizes = np.array([s_g] * n_g + [s_l] * n_l, np.float32)

    def boxes(frame: np.ndarray) -> np.ndarray:  # frame (..., ) side lengths -> (..., 4) x1, y1, x2, y2
        side = frame[..., None] * rng.uniform(0.3, 1.0, frame.shape + (2,))
        corner = (frame[..., None] - side) * rng.uniform(0.0, 1.0, frame.shape + (2,))
        return np.concatenate([corner, corner + side], axis=-1).astype(np.float32)

    boxes_gc = boxes(np.broadcast_to(sizes[:n_g, None], (b, n_g, views)).copy())
    boxes_all = boxes(np.broadcast_to(sizes[:, None], (b, views, n_g)).copy())
    for g in range(n_g):  # a global crop overlaps itself entirely
        boxes_gc[:, g, g] = boxes_all[:, g, g] = [0, 0, s_g, s_g]
    view_settings = from_config(config).views
    colour = np.array([draw_colour_params(rng, view_settings) for _ in range(b * views)], np.float32)
    colour = colour.reshape(b, views, -1)
    return {
        "global_crops": rng.integers(0, 256, (b, n_g, s_g, s_g, 3), np.uint8),
        "local_crops": rng.integers(0, 256, (b, n_l, s_l, s_l, 3), np.uint8),
        "global_colour": colour[:, :n_g],
        "local_colour": colour[:, n_g:],
        "boxes_gc": boxes_gc,
        "boxes_all": boxes_all,
    }


class Built(NamedTuple):
    """A case as the trainer builds it, on the mesh: what the loop's program is lowered from and called with."""

    settings: TrainSettings  # model.remat "auto" resolved
    training: step_lib.Training  # the models of that remat, optimizer groups; state and schedules on the mesh
    sums: Any  # the loop's fresh metric sums (neco_jax.step.empty_sums) on the mesh; the program donates them

    def lower(self, mesh) -> jax.stages.Lowered:
        """The loop's program, lowered by the trainer's own `neco_jax.step.lower_loop_step`: the very program
        a training run with these settings compiles (and the compilation cache holds)."""
        return step_lib.lower_loop_step(self.settings, self.training, mesh)[0]

    def compile(self, mesh) -> Any:
        """The loop's program compiled as the trainer compiles it (`neco_jax.step.compile_loop_step`): the
        executable this process already has for it where it has one (the remat resolution, a training run)."""
        return step_lib.compile_loop_step(self.settings, self.training, mesh, None)[0].compiled

    def step_fn(self):
        """The pure step, (state, batch, schedules) -> (state, metrics)."""
        return step_lib.make_train_step(self.settings, self.training.models, self.training.labels)


def build_step(config, mesh) -> Built:
    """The trainer's state, schedules and loop sums on random-init weights, built by the trainer's own builders
    and placed on the mesh as it places them; model.remat="auto" resolved as the trainer resolves it (against the
    devices' memory, where reported)."""
    settings = from_config(config)
    student, teacher = weights.random_params(settings, settings.run.seed)
    training = step_lib.build_training(settings, settings.optim.total_steps, student, teacher)
    repl = sharding.replicated(mesh)
    training = training._replace(
        state=jax.device_put(training.state, repl), schedules=jax.device_put(training.schedules, repl)
    )
    if settings.model.remat == "auto":
        fit, models = step_lib.compile_loop_step(settings, training, mesh, memory_fit.device_limit(mesh.devices.flat))
        settings = step_lib.with_remat(settings, fit.remat or "full")
        training = training._replace(models=models)
    return Built(settings, training, step_lib.empty_sums(nonfinite.cap(settings.optim), 0, repl))
