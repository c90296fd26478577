"""Non-finite steps: the loop program's sums on the device (step count, loss and gradient-norm sums, the
non-finite count with its runs and alarm) against NumPy, and the log window's means over the fetched sums."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from neco_jax import periodic
from neco_jax import step as step_lib


class _State(NamedTuple):
    step: jax.Array  # the step number after the step, as the train state's


def _run_sums(losses, norms, cap, start=10, run=0):
    """The sums after steps `start`, `start + 1`, ... with these losses and gradient norms, as `with_sums` (the
    loop's program) adds them."""
    sums = step_lib.empty_sums(cap, run)
    for i, (loss, norm) in enumerate(zip(losses, norms)):
        metrics = {
            "loss": jnp.float32(loss),
            "grad_norm": jnp.float32(norm),
            "finite": jnp.bool_(np.isfinite(loss) & np.isfinite(norm)),
        }
        step = step_lib.with_sums(lambda state, batch, sched, m=metrics: (state, m))
        _, _, sums = step(_State(jnp.int32(start + i)), None, sums, None)
    return jax.device_get(sums)


def test_sums_match_numpy_with_nonfinite_steps():
    losses = np.array([1.5, np.nan, 2.0, np.inf, np.nan, 0.25, 3.0], np.float32)
    norms = np.array([0.5, 1.0, np.nan, 2.0, 3.0, 0.125, np.inf], np.float32)
    sums = _run_sums(losses, norms, cap=3)
    bad = ~(np.isfinite(losses) & np.isfinite(norms))
    assert int(sums["steps"]) == 7 and int(sums["nonfinite"]) == bad.sum() == 5
    assert int(sums["first_nonfinite_step"]) == 11 and np.isnan(sums["first_nonfinite_loss"])
    assert float(sums["first_nonfinite_grad_norm"]) == 1.0 and int(sums["run"]) == 1
    assert int(sums["alarm_step"]) == 13 and float(sums["alarm_grad_norm"]) == 2.0  # steps 11, 12, 13 in a row
    assert int(_run_sums(losses, norms, cap=1)["alarm_step"]) == 11
    assert int(_run_sums(losses, norms, cap=4)["alarm_step"]) == 14
    assert int(_run_sums(losses, norms, cap=5)["alarm_step"]) == -1
    assert int(_run_sums(losses[:1], norms[:1], cap=2, run=5)["run"]) == 0
    assert int(_run_sums(losses[1:2], norms[1:2], cap=2, run=1)["alarm_step"]) == 10  # the run continues
    window = periodic.Log(1, writer=None, clock=None, total_steps=7)
    window.add(sums)
    assert np.isnan(window.means()["loss"])  # a non-finite step shows in the window mean, as before
    window.add(_run_sums([2.0] * 3, [4.0] * 3, cap=1))
    assert window.means() == {"loss": 2.0, "grad_norm_mean": 4.0} and window.steps == 0
