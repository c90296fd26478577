"""Protocol settings <-> job config sections: each protocol's ``*Settings`` dataclass holds its defaults.

Each default is written once, in the dataclass next to the comment that says where it comes from. The job
configs (``configs/eval/*.py``) build their protocol section from the dataclass (``config_section``) and the
runner reads it back (``from_config``). The dataclass rather than the config is the source so that the
evaluation functions stay usable from Python (``LinearSettings(epochs=5)``, tests, ``bench/``) without a
config file, with the protocol's defaults.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import ml_collections

S = TypeVar("S")


def config_section(defaults: Any, *, exclude: Iterable[str] = (), **extra: Any) -> ml_collections.ConfigDict:
    """A config section holding the fields of the settings object ``defaults`` (less ``exclude``), then ``extra``.

    ``extra`` adds the job-only fields of the section (ones the settings do not have, e.g. a data subset).
    """
    exclude = set(exclude)
    values = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(defaults) if f.name not in exclude}
    return ml_collections.ConfigDict({**values, **extra})


def from_config(settings_type: type[S], section: ml_collections.ConfigDict, **values: Any) -> S:
    """``settings_type`` from the section's fields of the same names (sequences as tuples), then ``values``.

    ``values`` gives the fields kept at the config's top level (e.g. the input size shared by every protocol).
    """
    names = {f.name for f in dataclasses.fields(settings_type)}
    found = {k: _frozen(v) for k, v in section.items() if k in names}
    return settings_type(**{**found, **values})


def top_level(config: ml_collections.ConfigDict, names: Mapping[str, str]) -> dict[str, Any]:
    """{settings field: config.<top-level field>} for the settings fields read from the config's top level."""
    return {field: config[key] for field, key in names.items()}


def _frozen(value: Any) -> Any:
    return tuple(value) if isinstance(value, list | tuple) else value
