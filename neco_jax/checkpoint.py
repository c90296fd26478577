"""Orbax checkpoints of a training run: the train state (student, teacher, optimizer, queue, RNG, step) and
the data iterator's position, in one step directory, so that a resumed run continues exactly.

Saves are asynchronous (the arrays are copied to host before `save` returns, then written in the
background) and atomic (orbax writes a temporary directory and renames it when complete, so a crash
mid-write leaves the previous checkpoint as the latest). The newest `keep` checkpoints are kept.

A checkpoint damaged later (truncated array files, a broken metadata file) is named with its step and file,
and the newest intact one is used instead (`newest_intact`); training moves the damaged one aside to
`<checkpoints>.corrupt/<step>` so that the resumed run can save that step again. Evaluation reads one model
of the newest intact checkpoint (`restore_part`) and leaves damaged ones where they are.

Every nnx.State of the train state is stored as the plain nested dict of its arrays (`train_state.to_pure`).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from neco_jax.errors import CheckpointError
from neco_jax.train_state import from_pure, to_pure

log = logging.getLogger(__name__)


_JSON_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding", "metadata")  # orbax's JSON files in a step


def _damage(step_dir: str, err: Exception) -> str:
    """'<file>: <reason>' of a failed restore: the file tensorstore's message names, else the first of orbax's
    JSON files that does not parse, else the step folder."""
    text = " ".join(str(err).split("[tensorstore_spec")[0].split())
    files = [f for f in re.findall(r'local file "([^"]+)"', text) if not f.endswith("/")]
    if files:
        reason = text.rsplit(f'{files[-1]}": ', 1)[-1]
        return f"{files[-1]}: {reason[:300]}"
    for root, _, names in sorted(os.walk(step_dir)):
        for name in sorted(n for n in names if n in _JSON_FILES):
            try:
                with open(os.path.join(root, name)) as f:
                    json.load(f)
            except (OSError, ValueError):
                return f"{os.path.join(root, name)}: {text[:300]}"
    return f"{step_dir}: {text[:300]}"


def newest_intact(
    directory: str, steps: list[int], restore: Callable[[int], Any], on_damaged: Callable[[int, str, int], None]
) -> tuple[int, Any]:
    """(step, restore(step)) of the newest step that restores; then `on_damaged(bad_step, damage, step)` for
    each newer one that did not. A `CheckpointError` (a checkpoint that does not fit the run) propagates; any
    other failure marks the step damaged. None restores: `CheckpointError` listing each step's damage."""
    damaged = []
    for step in sorted(steps, reverse=True):
        try:
            result = restore(step)
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001  (orbax and tensorstore raise many types for damaged files)
            damaged.append((step, _damage(os.path.join(directory, str(step)), err)))
            continue
        for bad, damage in damaged:
            on_damaged(bad, damage, step)
        return step, result
    raise CheckpointError(
        f"no checkpoint in {directory} can be read: "
        + "; ".join(f"step {step}: {damage}" for step, damage in damaged)
        + f"; move the damaged ones away (e.g. rm -r {directory}/<step>) or use a fresh --workdir"
    )


def _shapes(tree: Any) -> collections.Counter:
    return collections.Counter((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(tree))


def finished_steps(directory: str | os.PathLike) -> list[int]:
    """The steps of the finished checkpoints in `directory` (not those still being written)."""
    return sorted(ocp.utils.checkpoint_steps(directory)) if os.path.isdir(directory) else []


def saved_tree(directory: str | os.PathLike, step: int) -> dict:
    """The stored train state of checkpoint `step` as nested dicts of array metadata (shape, dtype), in its
    stored layout (`train_state.to_pure`), read from orbax's metadata without reading any array. Empty when
    orbax cannot read it (damaged array files; restoring names the file)."""
    with ocp.StandardCheckpointer() as reader:  # closed: each one holds a thread pool
        saved = reader.metadata(os.path.join(os.path.abspath(directory), str(step), "state")).item_metadata
    return {} if saved is None else saved.tree


def restore_part(directory: str | os.PathLike, step: int, abstract: Any) -> Any:
    """The part of checkpoint `step`'s train state that `abstract` names (a subtree from the root, e.g.
    {"teacher": {"backbone": abstract nnx.State}}; leaves `jax.ShapeDtypeStruct`s with shardings), read into
    that layout and nothing else. Read only; a damaged checkpoint raises what orbax raises."""
    target = to_pure(abstract)
    args = ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
    )
    with ocp.PyTreeCheckpointer() as reader:
        part = reader.restore(os.path.join(os.path.abspath(directory), str(step), "state"), args=args)
    return from_pure(abstract, part)


class Checkpointer:
    """`workdir/checkpoints/<step>/{state,data}`: asynchronous, keeping the last N. The training loop decides
    which steps are saved (`checkpoint_every_steps`, the last step, a stop signal)."""

    def __init__(self, directory: str | os.PathLike, *, keep: int):
        if keep < 1:
            raise CheckpointError(f"keep_checkpoints={keep} must be >= 1")
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            enable_async_checkpointing=True,
            create=False,  # the folder appears with the first checkpoint (a run stopped before leaves none)
        )
        self.directory = os.fspath(directory)
        self._manager = ocp.CheckpointManager(
            os.path.abspath(self.directory), options=options, item_names=("state", "data")
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict) -> None:
        """Start saving `step`; returns once the arrays are copied to host (force: orbax's own save policy,
        which could skip a step, is not consulted)."""
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(to_pure(state)), data=ocp.args.JsonSave(data_state)),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(train state laid out like `abstract_state`, data iterator state) of checkpoint `step`.

        Arrays that do not fit the run raise `CheckpointError`; a damaged checkpoint raises what orbax raises.
        """
        target = to_pure(abstract_state)
        saved = _shapes(saved_tree(self.directory, step))
        extra, missing = saved - _shapes(target), _shapes(target) - saved
        if saved and (extra or missing):  # no shapes at all: damaged array files (the restore names one)
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} does not match this run's model/optimizer (arrays only in "
                f"the checkpoint: {dict(extra)}, only in this run: {dict(missing)}); resume with the config that "
                "wrote it, or use a fresh --workdir"
            )
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
        )
        return from_pure(abstract_state, restored.state), restored.data

    def restore_newest_intact(self, abstract_state: Any) -> tuple[int, Any, dict]:
        """(step, state, data) of the newest checkpoint that can be read. Newer damaged ones are named in a
        warning and moved aside (by process 0) to `<directory>.corrupt/<step>`, so that their steps can be
        saved again; nothing is deleted."""
        aside = f"{self.directory}.corrupt"

        def on_damaged(step: int, damage: str, good: int) -> None:
            target, n = os.path.join(aside, str(step)), 1
            while os.path.exists(target):  # the same step damaged before
                target, n = os.path.join(aside, f"{step}.{n}"), n + 1
            if jax.process_index() == 0:
                os.makedirs(aside, exist_ok=True)
                shutil.move(os.path.join(self.directory, str(step)), target)
            log.warning(
                "checkpoint %s/%d is damaged (%s); resuming from step %d, the newest intact checkpoint. "
                "The damaged one was moved to %s; delete it with: rm -r %s",
                self.directory,
                step,
                damage,
                good,
                target,
                target,
            )

        step, (state, data) = newest_intact(
            self.directory, self._manager.all_steps(), lambda s: self.restore(s, abstract_state), on_damaged
        )
        if jax.process_count() > 1:  # every process lists the steps only once process 0 has moved them
            multihost_utils.sync_global_devices("checkpoints_moved_aside")
        self._manager.reload()
        return step, state, data

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(state: Any, sharding: jax.sharding.Sharding) -> Any:
    """Shape/dtype/sharding skeleton of `state`, the target orbax restores into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
