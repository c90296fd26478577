"""Orbax checkpoints of a training run: the train state (student, teacher, optimizer, queue, RNG, step) and
the data iterator's position, in one step directory, so that a resumed run continues exactly.

Saves are asynchronous (the arrays are copied to host before `save` returns, then written in the
background) and atomic (orbax writes a temporary directory and renames it when complete, so a crash
mid-write leaves the previous checkpoint as the latest). The newest `keep` checkpoints are kept.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from neco_jax.errors import UserError


class CheckpointError(UserError):
    """A checkpoint that does not fit the configured run."""


class Checkpointer:
    """`workdir/checkpoints/<step>/{state,data}`: periodic, asynchronous, keeping the last N."""

    def __init__(self, directory: str | os.PathLike, *, every_steps: int, keep: int):
        if every_steps < 1 or keep < 1:
            raise CheckpointError(f"checkpoint_every_steps={every_steps} and keep_checkpoints={keep} must be >= 1")
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every_steps,
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            enable_async_checkpointing=True,
            create=True,
        )
        self.directory = os.fspath(directory)
        self._manager = ocp.CheckpointManager(os.path.abspath(self.directory), options=options,
                                              item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
        """Start saving (if `step` is due, or `force`); returns whether a save was started."""
        return self._manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
            force=force)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(train state laid out like `abstract_state`, data iterator state) of checkpoint `step`."""
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} does not match this run's model/optimizer ({err}); "
                "resume with the config that wrote it, or use a fresh --workdir") from err
        return restored.state, restored.data

    def wait(self) -> None:
        """Block until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(state: Any, sharding: jax.sharding.Sharding) -> Any:
    """Shape/dtype/sharding skeleton of `state`, the target orbax restores into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
