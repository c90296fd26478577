"""The root of every error a user can cause and fix, and the kinds the input pipeline raises too.

The packages are layered: `input_pipeline` (lowest) <- `neco_jax` <- `evaluation` <- `configs`, with `main.py`,
`bench` and the tests on top (tests/test_imports.py asserts it). The root `UserError` and the two kinds every
layer raises (a bad setting, bad data) live here, in the lowest layer, so that the input pipeline raises them
without importing the trainer's package. `neco_jax.errors` re-exports them beside the other kinds, and every
module above the input pipeline imports them from there: one hierarchy, each error defined once
(tests/test_errors.py asserts it).
"""


class UserError(Exception):
    """A problem with the user's input (file, layout, config value) whose message names the thing and the fix.

    A CLI prints it as one line, without a traceback, and exits with status 2 (`neco_jax.errors.cli`)."""


class ConfigError(UserError):
    """A config field, recipe argument or command-line setting whose value cannot be used, alone or with the
    others or the data: the message names the setting and a value that works."""


class DatasetError(UserError):
    """The configured data is missing, empty, laid out differently than the named dataset expects, or holds
    more unreadable images than the configured fraction allows."""


class UndecodableImageError(Exception):
    """One record could not be read or decoded; the loader counts it and moves on (not a user error by itself)."""
