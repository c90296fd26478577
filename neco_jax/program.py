"""How every program of the project reads its command line: absl flags, ml_collections config files, and a
mistake on the command line as one line with exit status 2.

A program (`main.py`, `python -m evaluation`, `python -m evaluation.suite`, `python -m neco_jax.convert`,
`python -m neco_jax.plot`, the `bench/` scripts) defines its flags with absl at module level, a config file with
ml_collections' `config_flags.DEFINE_config_file`, takes positional arguments (a subcommand, a path) from the
`argv` absl hands to `main` (`flags_only(argv)` where it takes none), and ends with::

    if __name__ == "__main__":
        program.run(main)

Nothing imports a program module (`tests/test_programs.py`), so its flags exist only in its own process.
`run` answers a bad command line (an unknown flag, a bad value, a missing config file, an unknown config field)
with one line and exit status 2, and a `UserError` raised by `main` likewise (`neco_jax.errors.cli`). One of
several processes of a JAX distributed run leaves at once after such a line, without JAX's shutdown barrier at
exit, which held two processes that had both refused different configs for over two minutes after their
error lines (tests/test_multiprocess.py).
"""

from __future__ import annotations

import difflib
import gc
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from absl import app, flags
from ml_collections import config_flags

from neco_jax.errors import EXIT_USER_ERROR, ConfigError, UserError, cli, print_error

_CONFIG_FILE_TYPE = config_flags.config_flags.ConfigFileFlagParser("probe").flag_type()  # "config object"


def run(main: Callable[[list[str]], int | None]) -> NoReturn:
    """absl's `app.run(main)`, with `parse_flags` and `main`'s user errors as one line, exit status 2, and the
    cycle collector of `collect_garbage_less_often`."""
    collect_garbage_less_often()
    app.run(_leave_distributed_run_at_once(cli(main)), flags_parser=parse_flags)
    raise AssertionError("app.run returned")  # it always exits


def collect_garbage_less_often() -> None:
    """Python's cycle collector every 100 000 net allocations instead of every 700. Tracing a JAX program makes
    millions of short-lived objects; at the default threshold they were promoted until the collector walked the
    whole heap (JAX, flax, torch, the traced programs) again and again: 10 times in the demo's run (1.2 s of its
    12.4 s; then 0.4 s and 11.8 s in all), 31-33 times in each test worker (22-23 s; then 3 times, 6-7 s, at the
    same peak memory)."""
    gc.set_threshold(100_000, 10, 10)


def _leave_distributed_run_at_once(main: Callable[[list[str]], int | None]) -> Callable[[list[str]], int | None]:
    """`main`, whose user error on one of several JAX processes ends that process at once (`os._exit`): the
    error line is out, the trainer has closed its files, and the peers stop on the same verdict or on losing
    this process, instead of everyone waiting in JAX's shutdown barrier."""

    def run_main(argv: list[str]) -> int | None:
        status = main(argv)
        jax = sys.modules.get("jax")
        if status == EXIT_USER_ERROR and jax is not None and jax.distributed.is_initialized():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
        return status

    return run_main


def flags_only(argv: Sequence[str]) -> None:
    """For a program without positional arguments: a ConfigError naming any that `argv` (absl's rest) holds."""
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments: {' '.join(argv[1:])}; this program takes only flags (see --help)")


def parse_flags(argv: Sequence[str]) -> list[str]:
    """Parse `argv` into absl's FLAGS and load the config files it names; returns the positional arguments
    (argv[0] first). A bad command line prints one line and exits with status 2."""
    try:
        rest = flags.FLAGS(argv)
        for name in _config_flag_names():
            if flags.FLAGS[name].value is not None:
                flags.FLAGS[name].value.keys()  # a config file loads lazily: surface a broken one here
        return rest
    except UserError as err:  # e.g. an unknown recipe argument, raised by a config file's get_config
        sys.exit(print_error(err))
    except flags.Error as err:
        sys.exit(print_error(" ".join(str(err).split())))
    except (OSError, KeyError, AttributeError, TypeError, ValueError) as err:  # loading or overriding a config
        sys.exit(print_error(config_problem(argv, err)))


def _config_flag_names() -> list[str]:
    """The flags defined by `config_flags.DEFINE_config_file` (their parser's public type name)."""
    return [name for name in flags.FLAGS if flags.FLAGS[name].flag_type() == _CONFIG_FILE_TYPE]


def _value(argv: Sequence[str], name: str) -> str | None:
    """The value given to `--name` in argv (`--name=v` or `--name v`), the last one if repeated."""
    found = None
    for i, arg in enumerate(argv):
        if re.fullmatch(f"--?{re.escape(name)}", arg) and i + 1 < len(argv):
            found = argv[i + 1]
        elif re.match(f"--?{re.escape(name)}=", arg):
            found = arg.split("=", 1)[1]
    return found


def config_problem(argv: Sequence[str], err: BaseException) -> str:
    """One line for a config that cannot be loaded: a missing file, a file that fails to load, an override naming
    a field or section the config does not have (with the nearest names), or else the error itself."""
    text = " ".join(str(err).split())
    for name in _config_flag_names():
        given = _value(argv, name)
        if given is None:
            continue
        path = given.split(":", 1)[0]
        if not os.path.isfile(path):
            return f"config file {path!r} does not exist; pass --{name}=FILE.py[:ARGUMENT] naming an existing file"
        try:
            config = flags.FLAGS[name].parser.parse(given)  # the file alone, without the overrides
            config.keys()
        except Exception as load_error:  # noqa: BLE001 - the file itself fails to load: its error's last line says why
            return f"config file {path!r} cannot be loaded: {str(load_error).strip().splitlines()[-1]}"
        for override in _overrides(argv, name):
            unknown = unknown_field(config, override)
            if unknown:
                return f"--{name}.{override}: {unknown}"
    return f"the command line's config cannot be loaded: {text}"


def _overrides(argv: Sequence[str], name: str) -> list[str]:
    """The dotted field paths of argv's `--name.a.b[=v]` (and `--noname.a.b`) overrides."""
    found = []
    for arg in argv:
        match = re.match(rf"--?(?:no)?{re.escape(name)}\.([^=]+)", arg)
        if match:
            found.append(match.group(1))
    return found


def unknown_field(config, dotted: str) -> str | None:
    """Why `config` has no field `dotted` ('a.b.c'), naming the nearest existing names; None if it has it."""
    node, path = config, []
    for part in dotted.split("."):
        owner = "config." + ".".join(path) if path else "the config"
        if not hasattr(node, "keys"):
            return f"{owner} is a value, not a section"
        keys = sorted(node.keys())
        if part not in keys:
            close = difflib.get_close_matches(part, keys, n=3)
            hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
            return f"the config has no field or section {part!r}{hint}; {owner} has: {', '.join(keys)}"
        node = node[part]
        path.append(part)
    return None
