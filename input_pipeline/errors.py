"""The root of every error a user can cause and fix, and the input pipeline's own.

The packages are layered: `input_pipeline` (lowest) <- `neco_jax` <- `evaluation`, with `configs`, `main.py`,
`bench` and the tests on top (tests/test_imports.py asserts it). The root `UserError` lives here, in the
lowest layer, so that the input pipeline raises user errors without importing the trainer's package;
`neco_jax.errors` re-exports it with the other shared errors, and every other module imports them from there.
A CLI prints a `UserError` as one line without a traceback and exits with status 2.
"""


class UserError(Exception):
    """A problem with the user's input (file, layout, config value) whose message names the thing and the fix."""


class DatasetError(UserError):
    """The configured data is missing, empty or laid out differently than the named dataset expects."""


class TooManyBadImagesError(UserError):
    """More images failed to decode than the configured fraction allows, so the data is probably broken."""


class UndecodableImageError(Exception):
    """One record could not be read or decoded; the loader counts it and moves on (not a user error by itself)."""


class DataConfigError(UserError):
    """A data or augmentation setting in the config has a value the pipeline cannot use."""
