"""The dense protocols by name: the one place where a job's `config.protocol` is looked up.

A protocol is the module `evaluation.<name>`, with `run(config, model=None) -> dict` (`model`: a backbone in
memory, e.g. the teacher of a running training; None loads `config.checkpoint`) holding at least `"miou"` (a fraction in
[0, 1]); it may add `"per_class_iou"` (list), `"class_names"` and `"runs"` (a list of flat dicts, one row each,
e.g. one per K). It reads its data and backbone through `evaluation.job_inputs`, never through the runner.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from neco_jax.errors import ConfigError

NAMES = ("linear", "overcluster", "hummingbird", "cbfe")


def check_name(name: str) -> None:
    if name not in NAMES:
        raise ConfigError(f"config.protocol={name!r} is unknown; use one of {', '.join(NAMES)}")


def protocol(name: str) -> ModuleType:
    """The module of protocol `name` (a ConfigError naming the choices for another name)."""
    check_name(name)
    # Imported when a job asks for it: cbfe needs the optional eval extra (Infomap).
    return importlib.import_module(f"evaluation.{name}")
