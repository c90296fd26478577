"""Curves of a training run, at any time (also while it goes on): WORKDIR/metrics.png from its metrics.jsonl.

    python -m neco_jax.plot WORKDIR [--out=FILE.png]

Six panels over the step (loss, learning rates, weight decay, EMA momentum, gradient norm, images/s), the steps
the run resumed from marked (neco_jax/curves.py). A workdir without metrics: one line, exit status 2.
"""

from absl import flags

from neco_jax import curves, program
from neco_jax.errors import UserError

_OUT = flags.DEFINE_string("out", None, f"Output .png (default WORKDIR/{curves.PLOT_FILE}).")


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise UserError("name one training workdir: python -m neco_jax.plot WORKDIR [--out=FILE.png]")
    print(f"wrote {curves.write_plot(argv[1], _OUT.value)}")


if __name__ == "__main__":
    program.run(main)
