"""Frozen settings objects: each field's default, allowed values and role written once, in its definition.

A settings dataclass declares every field with `setting(...)`: the default, the values it allows (`choices`, or
a range), and whether changing it changes what a run computes (`computes=False` for bookkeeping such as a log
period; a training workdir's resume check reads it, `neco_jax.run_record`). `check` (called by each
dataclass's `__post_init__`) turns a value outside them into one `ConfigError` line naming
`config.<section>.<field>`; `to_section` and `from_section` move a settings object to and from its config
section, so that the recipe configs are built from the defaults here and read back into settings.

This module sits in the lowest package, as `input_pipeline/errors.py` does, so that the data settings (the
views' in `input_pipeline/views.py`, the loader's below) and the training settings (`neco_jax/settings.py`)
share it. It imports neither JAX nor Grain: a config builds without them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, TypeVar

from input_pipeline.errors import ConfigError

S = TypeVar("S")
_RANGE_KEYS = ("at_least", "above", "at_most", "below")


def setting(
    default: Any,
    *,
    choices: tuple = (),
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
    computes: bool = True,
) -> Any:
    """A settings field: its default, its allowed `choices` or range (bounds apply to every element of a tuple),
    and whether changing it changes the computation (`computes=False`: bookkeeping a resume may change)."""
    bounds = {"at_least": at_least, "above": above, "at_most": at_most, "below": below}
    metadata = {"choices": tuple(choices), "computes": computes, **bounds}
    if isinstance(default, Mapping):  # a section of free-form values (e.g. model.arch_overrides)
        return dataclasses.field(default_factory=lambda: dict(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def computes(field: dataclasses.Field) -> bool:
    """Whether changing `field` changes what is computed (fields declared without `setting` do)."""
    return field.metadata.get("computes", True)


def _range_text(meta: Mapping[str, Any]) -> str | None:
    lo, lo_open, hi, hi_open = meta["at_least"], False, meta["at_most"], False
    if meta["above"] is not None:
        lo, lo_open = meta["above"], True
    if meta["below"] is not None:
        hi, hi_open = meta["below"], True
    if lo is None and hi is None:
        return None
    if hi is None:
        return f"must be {'>' if lo_open else '>='} {lo:g}"
    if lo is None:
        return f"must be {'<' if hi_open else '<='} {hi:g}"
    return f"must lie in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def _in_range(value: float, meta: Mapping[str, Any]) -> bool:
    return (
        (meta["at_least"] is None or value >= meta["at_least"])
        and (meta["above"] is None or value > meta["above"])
        and (meta["at_most"] is None or value <= meta["at_most"])
        and (meta["below"] is None or value < meta["below"])
    )


def _check_finite(value: Any, name: str) -> None:
    """Every number is finite: a NaN passes every range check written as `x < 0`."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            _check_finite(item, f"{name}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_finite(item, f"{name}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name}={value} is not a finite number")


def field_name(settings: Any, name: str) -> str:
    """`config.<section>.<name>` of a field (`config.<name>` for the config's top level)."""
    section = getattr(settings, "SECTION", "")
    return f"config.{section}.{name}" if section else f"config.{name}"


def _tuple_of(field: dataclasses.Field, value: Any, name: str) -> tuple | None:
    """A `tuple[int, ...]` / `tuple[float, ...]` field's value with its elements of that kind (whole floats as
    ints, ints as floats); None for other fields. Anything else is one line naming the field: a command-line
    override such as `"(56,abc)"` reaches here as the string element `'(56,abc)'`."""
    kind = {"tuple[int, ...]": int, "tuple[float, ...]": float}.get(str(field.type))
    if kind is None:
        return None
    items = tuple(value) if isinstance(value, list | tuple) else (value,)
    if all(
        isinstance(v, int | float) and not isinstance(v, bool) and (kind is float or float(v).is_integer())
        for v in items
    ):
        return tuple(kind(v) for v in items)
    what = "whole numbers" if kind is int else "numbers"
    raise ConfigError(f'{name}={value!r} must be a tuple of {what}, e.g. --{name}="{field.default}"')


def check(settings: Any) -> None:
    """Every field of `settings` is of its kind, finite, one of its choices and inside its range; else one
    ConfigError line. Tuples of numbers are stored as their declared kind."""
    for field in dataclasses.fields(settings):
        value, name = getattr(settings, field.name), field_name(settings, field.name)
        numbers = _tuple_of(field, value, name)
        if numbers is not None:
            value = numbers
            object.__setattr__(settings, field.name, numbers)  # frozen: the one write, while it is checked
        _check_finite(value, name)
        meta = field.metadata
        if meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(f"{name}={value!r} is not one of {meta['choices']}")
        limits = _range_text(meta) if meta else None
        if limits is None:
            continue
        for item in value if isinstance(value, tuple) else (value,):
            if not _in_range(item, meta):
                raise ConfigError(f"{name}={value} {limits}")


def to_section(settings: Any) -> dict[str, Any]:
    """The fields of `settings` as the plain values of a config section (tuples stay tuples)."""
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}


def from_section(settings_type: type[S], section: Mapping[str, Any], **values: Any) -> S:
    """`settings_type` from the fields of `section` that it has (sequences as tuples, sections as dicts), then
    `values`; fields the section lacks keep their defaults (a config written before the field existed)."""
    names = {f.name for f in dataclasses.fields(settings_type)}
    found = {k: _plain(v) for k, v in section.items() if k in names}
    return settings_type(**{**found, **values})


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return tuple(_plain(v) for v in value) if isinstance(value, list | tuple) else value


@dataclasses.dataclass(frozen=True)
class LoaderSettings:
    """Which images train, and how the loader reads them (`config.data`, beside the views' settings)."""

    SECTION = "data"

    # Training images: "coco" (every file of data_dir/train2017), "voc", "imagenet100k", ... (input_pipeline.sources),
    # "tfds:NAME", or "sample": the 9 bundled photos (the CPU demo).
    dataset_name: str = setting("coco")
    # Root folder of the training images: required, except for dataset_name "sample" (and TFDS's default folder).
    data_dir: str = setting("")
    # Decode workers per host (the original's top-level `num_workers`, 20); 0 decodes in the training process.
    num_workers: int = setting(8, at_least=0, computes=False)
    # Reader threads in each worker (PIL and NumPy release the GIL for most of the work).
    threads_per_worker: int = setting(2, at_least=1, computes=False)
    # Apply EXIF orientation (False: the original, which ignores it).
    exif_transpose: bool = setting(True)
    # Stop when more than this share of the files read is unreadable (measured over at least 100 files).
    max_bad_fraction: float = setting(0.01, at_least=0, at_most=1)
    # For dataset_name "tfds:NAME": the split, and the image feature to read.
    tfds_split: str = setting("train")
    tfds_image_key: str = setting("image")

    def __post_init__(self):
        check(self)
