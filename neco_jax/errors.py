"""Errors a user can cause and fix: CLIs print these as one line, without a traceback."""


class UserError(Exception):
    """A problem with the user's input (file, layout, config value) whose message names the thing and the fix."""
