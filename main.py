"""NeCo post-training entry point.

    python main.py --config=configs/dinov2_s14.py --workdir=runs/s14 [--config.optim.batch_size=32 ...]
    python main.py --config=configs/dinov2r_xr_s14.py:odd_even --workdir=runs/ablation_odd_even
    python main.py --config=configs/demo.py --workdir=runs/demo          # CPU demo on the bundled photos

A workdir that already holds a checkpoint resumes from it (with the same config, unless
--allow_config_change). Exit status: 0 finished; 2 bad input (a missing config file, an unknown config
field, section or argument, a bad value, an unwritable workdir...: one line naming it); 128 + the signal
number (143 for SIGTERM, 130 for SIGINT) when a signal stopped the run after saving a checkpoint, which the
same command resumes; 1 anything else.
"""

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from neco_jax.errors import UserError, cli, print_error

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/*.py[:arg]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and exports.")
_ALLOW_CHANGE = flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Resume a workdir's checkpoint under a config that changes the computation (learning rate, total steps...); "
    "the earlier config is kept as config.<n>.json.",
)
flags.mark_flags_as_required(["config", "workdir"])


def _fail(message: str) -> None:
    sys.exit(print_error(message))


def _innermost_text(err: BaseException) -> str:
    """ml_collections nests the KeyError of an unknown name in an AttributeError: its first plain message."""
    msg = err
    while isinstance(msg, BaseException):
        msg = msg.args[0] if msg.args else str(msg)
    return " ".join(str(msg).split())


def _config_error(err: Exception, argv: list[str]) -> str:
    """One line for a config that cannot be loaded: a missing file, an unknown field or section."""
    text = _innermost_text(err)
    if isinstance(err, (KeyError, AttributeError)):
        name = text.split("'")[1] if text.count("'") >= 2 else text
        hint = text.split("Did you mean", 1)[1].split('"')[1] if 'Did you mean "' in text else ""
        given = [a.split("=")[0] for a in argv if a.startswith("--config.") and name in a.split("=")[0].split(".")]
        return (
            f"{given[0] if given else '--config'}: the config has no field or section {name!r}"
            + (f" (did you mean {hint!r}?)" if hint else "")
            + "; see configs/base.py for the fields"
        )
    path = next((a.split("=", 1)[1].split(":")[0] for a in argv if a.startswith("--config=")), "")
    if path and not os.path.isfile(path):
        return f"config file {path!r} does not exist; pass --config=configs/<recipe>.py (see configs/)"
    return f"the config cannot be loaded: {text}"


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad command line or config as one line and exit status 2."""
    try:
        rest = flags.FLAGS(argv)
        _CONFIG.value.model  # noqa: B018  (the file loads lazily: surface a missing or broken one here)
        return rest
    except UserError as err:  # e.g. an unknown recipe argument (configs/base.py)
        _fail(str(err))
    except flags.Error as err:
        _fail(" ".join(str(err).split()))
    except (OSError, KeyError, AttributeError, TypeError, ValueError) as err:
        _fail(_config_error(err, argv))


@cli  # a UserError from training: one line, exit status 2
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save INFO chatter would bury the progress
    # Imported after the flags are parsed: a bad command line is answered before JAX loads.
    from evaluation.monitor import make_monitor
    from neco_jax import train

    result = train.train_and_evaluate(
        _CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CHANGE.value, make_monitor=make_monitor
    )
    if result["stopped_by_signal"] is not None:  # a scheduler sees "stopped, resumable", not "finished"
        sys.exit(128 + result["stopped_by_signal"])


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
