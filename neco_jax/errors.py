"""Errors a user can cause and fix: CLIs print these as one line, without a traceback.

`UserError`, the root, is defined in `input_pipeline.errors` (the lowest layer, which must not import this
package) and re-exported here; see that module for the layering.
"""

from input_pipeline.errors import UserError

__all__ = ["UserError"]
