"""Input errors a user can fix (bad data folder, too many unreadable images), as `UserError`s."""

from neco_jax.errors import UserError


class DatasetError(UserError):
    """The configured data is missing, empty or laid out differently than the named dataset expects."""


class TooManyBadImagesError(UserError):
    """More images failed to decode than the configured fraction allows, so the data is probably broken."""


class UndecodableImageError(Exception):
    """One record could not be read or decoded; the loader counts it and moves on (not a user error by itself)."""


class DataConfigError(UserError):
    """A data or augmentation setting in the config has a value the pipeline cannot use."""
