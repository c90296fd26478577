"""Batches on their way to the devices: put there ahead of the step, their memory released as soon as the step
is done with them. With the metrics summed on the device in the step itself (neco_jax/step.py), this keeps the
device busy between the host's round trips, which happen only when it logs or checkpoints.

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
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import numpy as np

PREFETCH_BATCHES = 2  # batches placed on the devices ahead of the step


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


def release(batch: dict[str, jax.Array]) -> None:
    """Delete the batch's device buffers; safe right after dispatching a step that reads them (see above)."""
    for x in jax.tree.leaves(batch):
        x.delete()
