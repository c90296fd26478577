"""The EMA teacher: `theta_t <- m theta_t + (1 - m) theta_s` over every parameter, head included.

The momentum follows the original's cosine schedule (`experiments/utils.py::cosine_scheduler`) from
`momentum` (0.9995) towards `momentum_end` (1.0), one value per iteration t = 0 .. total-1.

One-step lag, kept on purpose: the original updates the teacher inside `training_step`, which Lightning
runs in the optimizer closure *before* `optimizer.step()`, so at step t the teacher moves towards the
student weights of step t (before that step's AdamW update) with m(t). The train step here does the same:
it computes the EMA from the pre-update student params, then applies the optimizer update. Matching it
keeps teacher trajectories (and hence the targets) identical to the original's for the same student
trajectory; the lag is one step out of tens of thousands, so "fixing" it would buy nothing.
"""

from typing import Any

import jax
import optax

from neco_jax.optim import Cosine, cosine_schedule


def ema_rate_schedule(momentum: float, momentum_end: float, total_steps: int) -> Cosine:
    """`1 - m(t)` of the cosine momentum schedule, computed without forming m first.

    In float32, `1 - 0.9995` carries a relative error of ~5e-5; building the rate from the
    double-precision complements keeps it exact to float32 rounding.
    """
    return cosine_schedule(1.0 - float(momentum), 1.0 - float(momentum_end), total_steps)


def ema_update(teacher: Any, student: Any, rate: jax.Array) -> Any:
    """`rate * student + (1 - rate) * teacher` leaf by leaf (rate = 1 - momentum): optax's Polyak average,
    student as the new and teacher as the old tensors."""
    return optax.incremental_update(student, teacher, rate)
