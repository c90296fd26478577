"""The record a training workdir keeps of its starts, and the checks that protect it.

`config.json` holds the config of the latest start. A start whose config differs from it first moves it to
`config.<n>.json` (n = 1, 2, ...: the earlier versions, oldest first), and every start appends a line to
`starts.jsonl` (time, step it started from, the fields it changed). These are written only once the run has
really started (setup done, first step compiled), so a start that fails leaves the record as it was.

A resume whose config changes what is computed (learning rate, sort network, total steps, registers...)
is refused with the list of differences unless it is explicitly allowed (`main.py --allow_config_change`):
the checkpoint's state only makes sense under the config that wrote it. Which fields change the computation
is said by their settings fields (`computes`, neco_jax/settings.py).
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
from typing import Any

import ml_collections
from flax import traverse_util

from neco_jax import settings
from neco_jax.errors import ConfigChangedError, WorkdirError
from neco_jax.files import atomic_write_text

CONFIG_FILE = "config.json"
STARTS_FILE = "starts.jsonl"


def prepare_workdir(workdir: str) -> None:
    """Create `workdir` and make sure files can be written in it, before anything is built."""
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir, prefix=".write_test"):
            pass
    except OSError as err:
        raise WorkdirError(
            f"cannot write to the workdir {workdir} ({err.strerror or err}); choose a writable "
            "--workdir or fix its permissions"
        ) from err


def _as_json(config: ml_collections.ConfigDict) -> str:
    return config.to_json_best_effort(indent=2, sort_keys=True)


def _flatten(config: dict) -> dict[str, Any]:
    """'a.b' -> value of a config dict; an empty section stays a field holding {}."""
    flat = traverse_util.flatten_dict(config, keep_empty_nodes=True, sep=".")
    return {k: {} if v is traverse_util.empty_node else v for k, v in flat.items()}


def config_changes(old: dict, new: dict) -> list[str]:
    """'field: old -> new' for every field that differs (absent on one side: '<absent>'), sorted by field."""
    a, b = _flatten(old), _flatten(new)
    missing = "<absent>"
    return [
        f"{k}: {a.get(k, missing)!r} -> {b.get(k, missing)!r}"
        for k in sorted(a.keys() | b.keys())
        if a.get(k, missing) != b.get(k, missing)
    ]


def stored_config(workdir: str) -> dict | None:
    """The config of the workdir's latest start, or None when it has none."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigChangedError(
            f"{path} cannot be read ({err}); restore it, or move it away to resume without comparing configs"
        ) from err


def check_resume(workdir: str, config: ml_collections.ConfigDict, *, allow_change: bool) -> list[str]:
    """Refuse a resume whose config changes the computation of the stored run (unless `allow_change`);
    returns every difference (bookkeeping fields included)."""
    stored = stored_config(workdir)
    if stored is None:
        return []
    new = json.loads(_as_json(config))
    old_fields, new_fields = _flatten(stored), _flatten(new)
    changes = config_changes(stored, new)
    computing = [c for c in changes if _changes_computation(c.split(":")[0], old_fields, new_fields)]
    if computing and not allow_change:
        raise ConfigChangedError(
            f"{os.path.join(workdir, CONFIG_FILE)} differs from this config in fields that change the computation: "
            f"{'; '.join(computing)}. Resume with the stored config, use a fresh --workdir, or pass "
            "--allow_config_change to continue the checkpoint with the new values"
        )
    return changes


def _changes_computation(field: str, old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether a changed field changes the computation, as its settings field says (`neco_jax.settings`). A field
    the stored config lacks does not when it is at its default: a field is added with the behaviour it replaces
    as its default, which is what the stored run computed."""
    if not settings.changes_computation(field):
        return False
    return field in old or settings.field_of(field) is None or new.get(field) != settings.default_of(field)


def record_start(workdir: str, config: ml_collections.ConfigDict, step: int) -> str | None:
    """Write the config of this start (keeping a differing earlier one as config.<n>.json) and its line in
    starts.jsonl; returns the name the earlier version was kept under, if one was."""
    text = _as_json(config)
    path = os.path.join(workdir, CONFIG_FILE)
    kept, changes = None, []
    if os.path.isfile(path):
        with open(path) as f:
            old_text = f.read()
        if old_text != text:
            n = 1
            while os.path.exists(os.path.join(workdir, f"config.{n}.json")):
                n += 1
            kept = f"config.{n}.json"
            os.replace(path, os.path.join(workdir, kept))
            try:
                changes = config_changes(json.loads(old_text), json.loads(text))
            except ValueError:
                changes = ["<earlier config unreadable>"]
    if kept is not None or not os.path.isfile(path):
        atomic_write_text(path, text)
    line = {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "step": step,
        "config": CONFIG_FILE,
        "previous_config": kept,
        "changes": changes,
    }
    with open(os.path.join(workdir, STARTS_FILE), "a") as f:
        f.write(json.dumps(line) + "\n")
    return kept
