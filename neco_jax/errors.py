"""Errors a user can cause and fix, one class per kind, and `cli`, which turns them into one line and exit 2.

`UserError` (the root), `ConfigError` and `DatasetError` are defined in `input_pipeline.errors` (the lowest
layer, which must not import this package; see its docstring) and re-exported here with the kinds that only
this package and the ones above it raise; every module above the input pipeline imports them from here.
"""

import functools
import sys
from collections.abc import Callable

from input_pipeline.errors import ConfigError, DatasetError, UserError

__all__ = [
    "CheckpointError",
    "ConfigChangedError",
    "ConfigError",
    "DatasetError",
    "DistributedError",
    "DownloadError",
    "NonFiniteError",
    "StepMemoryError",
    "UserError",
    "WorkdirError",
    "cli",
    "print_error",
]

EXIT_USER_ERROR = 2  # the exit status of every CLI for a UserError (1 stays "anything else")


class CheckpointError(UserError):
    """A checkpoint or weight file (or the config stored with it) that cannot be read, or whose keys, shapes
    or recorded architecture do not fit the model it is loaded into."""


class NonFiniteError(UserError):
    """Weights, loss, gradients or features hold NaN or infinity: nothing computed from them means anything.
    (Training keeps its last good checkpoint.)"""


class StepMemoryError(UserError):
    """The training step needs more memory per device than the device has, with every rematerialisation allowed."""


class WorkdirError(UserError):
    """The workdir cannot be created or written."""


class ConfigChangedError(UserError):
    """A resume with a config that changes the computation of the stored run."""


class DistributedError(UserError):
    """Processes that cannot start together: an unreachable coordinator, missing variables, different configs."""


class DownloadError(UserError):
    """A pretrained file could not be fetched (offline, moved, or a bad URL)."""


def print_error(message: object) -> int:
    """Print `error: <message>` as one line on stderr; returns the exit status of a user error."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def cli(main: Callable[..., int | None]) -> Callable[..., int | None]:
    """Decorate a CLI's `main`: a `UserError` it raises is printed by `print_error` and returned as exit status 2
    (no traceback); anything else propagates."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            return print_error(err)

    return run
