"""Will a recipe fit a device this machine does not have? Compile its real training step for it and read XLA's
memory account (deviceless ahead-of-time compilation, see neco_jax/plan/compile.py).

    python -m neco_jax.plan --config=configs/dinov2_s14.py --target=h100-80gb
    python -m neco_jax.plan --config=configs/dinov2_b14.py --target=a100-40gb,tpu-v5e-8 --config.model.dtype=bfloat16
    python -m neco_jax.plan --config=configs/dinov2_s14.py --target=h100-80gb --features=configs/eval/voc_linear.py
    python -m neco_jax.plan --config=configs/demo.py --target=h100-80gb,tpu-v5e-1 --json

Prints per target and device: arguments, temporaries, peak, the memory it is compared with and whether it fits
(for model.remat="auto", each choice tried, as the trainer tries them), the step's FLOPs, its HLO memory traffic
and the compiler's step-time estimate where the backend gives one (TPU). Needs the planning extra:
`pip install 'neco-jax[plan]'` (the CUDA plugin of JAX for GPU targets, libtpu for TPU targets). Exit status 2
for a bad target, config or a missing extra (one line), 0 otherwise, fitting or not.
"""

import os

# Before JAX loads: stay on the CPU (the CUDA plugin would try to start a GPU this machine lacks); the targets'
# compilers are reached through their topologies.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from neco_jax import program  # noqa: E402
from neco_jax.plan.report import describe  # noqa: E402
from neco_jax.plan.targets import NAMES, get_target  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/*.py[:arg]).", lock_config=True
)
_TARGETS = flags.DEFINE_list("target", ["h100-80gb"], f"Targets, comma-separated: {', '.join(NAMES)}.")
_FEATURES = config_flags.DEFINE_config_file(
    "features", None, "Also plan this evaluation job's feature forward (configs/eval/*.py).", lock_config=True
)
_FRACTION = flags.DEFINE_float(
    "memory_fraction",
    None,
    "Share of a GPU's memory a run may use (default: $XLA_PYTHON_CLIENT_MEM_FRACTION, else JAX's 0.75).",
)
_JSON = flags.DEFINE_bool("json", False, "Print the results as JSON instead of text.")
flags.mark_flags_as_required(["config"])


def main(argv) -> int:
    program.flags_only(argv)
    from neco_jax.plan import compile as plan_compile  # JAX loads here, after the environment is set

    logging.getLogger("neco_jax").setLevel(logging.WARNING)
    fraction = _FRACTION.value
    if fraction is None and os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"):
        fraction = float(os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"])
    results = []
    for name in _TARGETS.value:
        target = get_target(name)
        jobs = [lambda t=target: plan_compile.plan_training(_CONFIG.value, t, fraction=fraction)]
        if _FEATURES.value is not None:
            jobs.append(
                lambda t=target: plan_compile.plan_features(_CONFIG.value, _FEATURES.value, t, fraction=fraction)
            )
        for job in jobs:
            result = job()
            results.append(result)
            if not _JSON.value:
                print(describe(result), flush=True)
    if _JSON.value:
        json.dump({"results": results, "note": plan_compile.NOT_AUTOTUNED}, sys.stdout, indent=2)
        print()
    else:
        print(f"note: {plan_compile.NOT_AUTOTUNED}")
    return 0


if __name__ == "__main__":
    program.run(main)
