"""Non-finite training steps, in one place: the step's own check, the device's count, and the host's verdict.

A step is non-finite when its loss or gradient norm is, or when its update made the new state non-finite (an
overflowing step, a NaN schedule value): the state itself is checked, so that nothing non-finite ever reaches
a checkpoint or an export. Such a step changes nothing but the step counter and the RNG (`keep_finite`), in
both modes of `optim.on_nonfinite`: "error" then stops at the first one, "skip" after `max_consecutive_skips`
of them in a row (`cap`).

The device counts them in the sums the loop carries from step to step (`count`, no host sync); the host reads
the count whenever it fetches the sums (at log and checkpoint steps) and raises `NonFiniteError` naming the
step, or logs the steps it skipped (`check`).
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from neco_jax.errors import NonFiniteError
from neco_jax.settings import OptimSettings

log = logging.getLogger(__name__)


def all_finite(tree: Any) -> jax.Array:
    """One boolean: every floating-point entry of `tree` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def keep_finite(finite: jax.Array, new: Any, old: Any) -> Any:
    """`new` where the step was finite, else `old`, leaf by leaf (inside the step: no branch)."""
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def cap(settings: OptimSettings) -> int:
    """Non-finite steps in a row that stop training: "error" stops at the first, "skip" at the
    max_consecutive_skips-th."""
    return 1 if settings.on_nonfinite == "error" else settings.max_consecutive_skips


def empty_counts(limit: int, run: int = 0) -> dict[str, Any]:
    """The device's count since the last fetch; `limit`: the non-finite steps in a row that stop training (`cap`),
    carried as a value so that runs differing in it (or in `optim.on_nonfinite`) share one compiled step; `run`:
    the non-finite steps in a row that ended the previous count (a run continues across fetches). NumPy values:
    the caller places them."""
    ints = {"nonfinite": 0, "first_nonfinite_step": -1, "run": run, "alarm_step": -1, "limit": limit}
    floats = ("first_nonfinite_loss", "first_nonfinite_grad_norm", "alarm_loss", "alarm_grad_norm")
    return {**{k: np.int32(v) for k, v in ints.items()}, **{k: np.float32(np.nan) for k in floats}}


def count(counts: dict[str, jax.Array], metrics: dict[str, jax.Array], step) -> dict[str, jax.Array]:
    """Add step `step`'s finiteness to the count, on the device.

    The alarm is the first step that ends `counts["limit"]` non-finite steps in a row (1: the first one); its
    loss and gradient norm are kept for the error message, as are the first non-finite step's for the warning.
    """
    bad = ~metrics["finite"]
    first = bad & (counts["first_nonfinite_step"] < 0)
    run = jnp.where(bad, counts["run"] + 1, 0)
    alarm = (run >= counts["limit"]) & (counts["alarm_step"] < 0)
    keep = lambda cond, new, old: jnp.where(cond, new, old)  # noqa: E731
    return {
        "nonfinite": counts["nonfinite"] + bad.astype(jnp.int32),
        "first_nonfinite_step": keep(first, jnp.int32(step), counts["first_nonfinite_step"]),
        "first_nonfinite_loss": keep(first, metrics["loss"], counts["first_nonfinite_loss"]),
        "first_nonfinite_grad_norm": keep(first, metrics["grad_norm"], counts["first_nonfinite_grad_norm"]),
        "run": run,
        "alarm_step": keep(alarm, jnp.int32(step), counts["alarm_step"]),
        "alarm_loss": keep(alarm, metrics["loss"], counts["alarm_loss"]),
        "alarm_grad_norm": keep(alarm, metrics["grad_norm"], counts["alarm_grad_norm"]),
        "limit": counts["limit"],
    }


def _describe(loss: float, grad_norm: float) -> str:
    if not np.isfinite(loss) or not np.isfinite(grad_norm):
        return f"the loss ({loss}) or the gradient norm ({grad_norm}) is not finite"
    return (
        f"the update (loss {loss}, gradient norm {grad_norm}) made the weights, teacher, optimizer state or queue "
        "non-finite"
    )


def check(counts: dict[str, Any], step: int, skipped_total: int, settings: OptimSettings, checkpoints: str) -> int:
    """The host's verdict on a fetched count (`step`: where it was fetched; `skipped_total`: the run's skipped
    steps so far): NonFiniteError at an alarm, a warning for skipped steps. Returns the run it ends with."""
    limit, skip = cap(settings), settings.on_nonfinite == "skip"
    if counts["alarm_step"] >= 0:
        fix = (
            f" (optim.max_consecutive_skips={limit} sets how many are skipped)"
            if skip
            else (", or set optim.on_nonfinite=skip")
        )
        raise NonFiniteError(
            f"step {counts['alarm_step']}: {f'{limit} non-finite steps in a row, ' if skip else ''}"
            f"{_describe(counts['alarm_loss'], counts['alarm_grad_norm'])}; the update was not applied (found at "
            f"step {step}, where metrics are fetched) and the last good checkpoint in {checkpoints} is kept. Lower "
            f"the learning rate or enable optim.grad_clip_norm{fix}"
        )
    if counts["nonfinite"]:
        log.warning(
            "steps up to %d: %d non-finite, the first at step %d: %s; updates skipped (%d so far)",
            step,
            counts["nonfinite"],
            counts["first_nonfinite_step"],
            _describe(counts["first_nonfinite_loss"], counts["first_nonfinite_grad_norm"]),
            skipped_total,
        )
    return int(counts["run"])
