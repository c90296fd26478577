"""Run a program of the project (`python -m MODULE ARGS...`) inside the test process, as a fresh process would
see it, for the CLI tests that would otherwise pay a process start and JAX's import each.

A program defines its absl flags when it runs (neco_jax/program.py); they are removed again afterwards, with
the values parsed, so that the next program (which may define a flag of the same name) starts clean. absl's log
handler is on the root logger during a run, as in a program's own process (a warning goes to stderr), and only
then.
"""

from __future__ import annotations

import logging
import runpy
import sys

from absl import app, flags
from absl import logging as absl_logging

from neco_jax import program  # noqa: F401  (absl's own flags, defined on import, stay across runs)


def run_program(module: str, *argv: str) -> int:
    """The exit status of `python -m module *argv`, run in this process."""
    app.define_help_flags()
    before = set(flags.FLAGS)
    saved_argv, saved_handlers, saved_level = sys.argv, logging.root.handlers[:], logging.root.level
    absl_logging.use_absl_handler()  # app.run installs it only on its first run in a process
    sys.argv = [module, *argv]  # ml_collections' config flags read their overrides from sys.argv
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=False)
    except SystemExit as stop:
        return 0 if stop.code is None else stop.code
    finally:
        sys.argv = saved_argv
        logging.root.handlers[:] = saved_handlers
        logging.root.setLevel(saved_level)
        for name in set(flags.FLAGS) - before:
            delattr(flags.FLAGS, name)
        flags.FLAGS.unparse_flags()
    raise AssertionError(f"{module} returned instead of exiting")
