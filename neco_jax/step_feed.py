"""What keeps the device busy between host round trips: batches put on the devices ahead of the step, their
memory released as soon as the step is done with them, and the step metrics summed on the device in the step
itself, so the host fetches them only when it logs or checkpoints.

JAX dispatches the jitted step asynchronously; the loop therefore runs ahead of the device until it asks for
a value. Asking every step (as `float(metrics["loss"])` does) leaves one step in flight and the device idle
while the host reads, decodes and transfers the next batch.

The batch is not donated to the step: XLA reuses a donated buffer only for an output of the same shape and
type, and the step returns nothing shaped like a batch, so JAX would warn ("Some donated buffers were not
usable") and keep the buffers anyway. Instead `release` deletes the batch's device buffers right after the
step is dispatched: PJRT frees a deleted buffer once the computations already enqueued on it have finished
(PjRtBuffer::Delete in xla/pjrt/pjrt_client.h), so its memory (uint8: about 110 MB at 518/98 and batch 64)
returns as soon as the step completes, whatever the loop still references.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Fed(NamedTuple):
    """One prefetched batch: its device arrays, and the loader state right after it (checkpoint it with the
    step that consumes it; its counts are those of the batches up to this one)."""

    batch: dict[str, jax.Array]
    data_state: dict


def prefetch(loader, put: Callable[[dict[str, np.ndarray]], dict[str, jax.Array]], size: int) -> Iterator[Fed]:
    """Batches of `loader` placed on the devices by `put`, `size` of them ahead of the one handed out.

    Batches fetched ahead and never consumed (a stop, a preemption) are simply dropped: the state saved with a
    step is the loader's state right after that step's batch, so a resume continues exactly there. A batch's
    unreadable images are reported (`loader.report`: a warning each, the bad-fraction stop) when the batch is
    handed out, not when it is fetched: the warnings then name exactly the images whose skipping the step's
    `skipped_images` count includes, and a stop never names images of batches no step trained on.
    """
    queue = collections.deque()

    def hand_out() -> Fed:
        fed, host = queue.popleft()
        loader.report(host, fed.data_state)
        return fed

    while True:
        try:
            batch = loader.fetch()
        except StopIteration:
            break
        host = {k: batch[k] for k in ("index", "skipped")}  # what `report` reads, kept on the host
        queue.append((Fed(put(batch), loader.get_state()), host))
        if len(queue) > size:
            yield hand_out()
    while queue:
        yield hand_out()


def empty_sums(run: int = 0, sharding: jax.sharding.Sharding | None = None) -> dict[str, jax.Array]:
    """Device-side sums over the steps since the last fetch (see `accumulate`); `run`: the non-finite steps in
    a row that ended the previous sums (a run continues across fetches). With `sharding`, made by a jitted
    program with that output sharding, as the step returns them (on several processes `jax.device_put` would
    compare the NaN entries between processes, and NaN != NaN)."""
    if sharding is not None:
        return _empty_sums_program(sharding)(run)
    ints = {"steps": 0, "nonfinite": 0, "first_nonfinite_step": -1, "run": run, "alarm_step": -1}
    floats = {
        "loss_sum": 0.0,
        "grad_norm_sum": 0.0,
        "first_nonfinite_loss": np.nan,
        "first_nonfinite_grad_norm": np.nan,
        "alarm_loss": np.nan,
        "alarm_grad_norm": np.nan,
    }
    # one buffer each: the step donates them, and a buffer cannot be donated twice in one call
    return {
        **{k: jnp.array(v, jnp.int32) for k, v in ints.items()},
        **{k: jnp.array(v, jnp.float32) for k, v in floats.items()},
    }


@functools.cache
def _empty_sums_program(sharding: jax.sharding.Sharding) -> Callable:
    """`empty_sums` jitted with that output sharding, once per sharding (compiled once per `run` value)."""
    return jax.jit(empty_sums, static_argnums=0, out_shardings=sharding)


def release(batch: dict[str, jax.Array]) -> None:
    """Delete the batch's device buffers; safe right after dispatching a step that reads them (see above)."""
    for x in jax.tree.leaves(batch):
        x.delete()


def with_sums(step_fn: Callable, cap: int) -> Callable:
    """The step `(state, batch) -> (state, metrics)` as `(state, batch, sums) -> (state, metrics, sums)`: the
    sums of `accumulate` updated in the same program, so each step is one dispatch."""

    def step(state, batch, sums):
        state, metrics = step_fn(state, batch)
        return state, metrics, accumulate(sums, metrics, state.step, cap)

    return step


def accumulate(sums: dict[str, jax.Array], metrics: dict[str, jax.Array], step, cap) -> dict[str, jax.Array]:
    """Add step `step`'s loss, gradient norm and finiteness to the sums, on the device (no host sync).

    The alarm is the first step that ends `cap` non-finite steps in a row (cap 1: the first non-finite step);
    its loss and gradient norm are kept for the error message.
    """
    bad = ~metrics["finite"]
    first = bad & (sums["first_nonfinite_step"] < 0)
    run = jnp.where(bad, sums["run"] + 1, 0)
    alarm = (run >= cap) & (sums["alarm_step"] < 0)
    keep = lambda cond, new, old: jnp.where(cond, new, old)  # noqa: E731
    return {
        "steps": sums["steps"] + 1,
        "loss_sum": sums["loss_sum"] + metrics["loss"].astype(jnp.float32),
        "grad_norm_sum": sums["grad_norm_sum"] + metrics["grad_norm"].astype(jnp.float32),
        "nonfinite": sums["nonfinite"] + bad.astype(jnp.int32),
        "first_nonfinite_step": keep(first, jnp.int32(step), sums["first_nonfinite_step"]),
        "first_nonfinite_loss": keep(first, metrics["loss"], sums["first_nonfinite_loss"]),
        "first_nonfinite_grad_norm": keep(first, metrics["grad_norm"], sums["first_nonfinite_grad_norm"]),
        "run": run,
        "alarm_step": keep(alarm, jnp.int32(step), sums["alarm_step"]),
        "alarm_loss": keep(alarm, metrics["loss"], sums["alarm_loss"]),
        "alarm_grad_norm": keep(alarm, metrics["grad_norm"], sums["alarm_grad_norm"]),
    }


class LogWindow:
    """Host-side totals of the fetched sums since the last log line (a checkpoint fetch does not end it)."""

    def __init__(self):
        self.steps, self.loss_sum, self.grad_norm_sum = 0, 0.0, 0.0

    def add(self, sums: dict[str, Any]) -> None:
        self.steps += int(sums["steps"])
        self.loss_sum += float(sums["loss_sum"])
        self.grad_norm_sum += float(sums["grad_norm_sum"])

    def means(self) -> dict[str, float]:
        """Window means (NaN if a step of the window was not finite), then start a new window."""
        n = max(self.steps, 1)
        out = {"loss": self.loss_sum / n, "grad_norm_mean": self.grad_norm_sum / n}
        self.__init__()
        return out
