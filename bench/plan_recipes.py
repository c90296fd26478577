"""Every recipe's training step, default and bfloat16, planned for GPUs and TPUs this machine lacks
(`neco_jax.plan`: deviceless compilation, XLA's memory account): the README's table of peak memory per device
and whether it fits, with model.remat="auto" resolved against each target's memory as the trainer resolves it.

    python bench/plan_recipes.py                                   # every recipe, H100 80GB, A100 40GB, TPU v5e-8
    python bench/plan_recipes.py --recipes=dinov2_s14 --targets=h100-80gb --dtypes=float32
Recipes with the same program (the same architecture, registers and shapes; only their initial weights differ)
are compiled once. Prints a Markdown table and writes bench/results/plan_recipes.json ($BENCH_RESULTS_DIR).
Each full-size compilation takes minutes of CPU and several GB of memory: they run one after another.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before JAX loads: the targets are reached through topologies

import functools  # noqa: E402
import importlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from bench import common  # noqa: E402
from configs import base  # noqa: E402
from neco_jax import program  # noqa: E402
from neco_jax.plan import compile as plan_compile  # noqa: E402
from neco_jax.plan.targets import get_target  # noqa: E402

TARGETS = ("h100-80gb", "a100-40gb", "tpu-v5e-8")
# What decides the program: everything but the initial weights and the learning rates.
_PROGRAM_FIELDS = ("model.arch", "model.num_register_tokens", "data.size_crops", "optim.batch_size", "loss.use_queue")


def program_key(config) -> tuple:
    return tuple(str(functools.reduce(getattr, field.split("."), config)) for field in _PROGRAM_FIELDS)


_RECIPES = flags.DEFINE_list("recipes", list(base.RECIPES), "Recipes (configs/<name>.py).")
_TARGETS = flags.DEFINE_list("targets", list(TARGETS), "Targets (neco_jax.plan.targets).")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes (config.model.dtype).")
_OUT = flags.DEFINE_string("out", None, "JSON path (default bench/results/plan_recipes.json).")


def main(argv) -> None:
    program.flags_only(argv)
    rows, done = [], {}
    for dtype in _DTYPES.value:
        for recipe in _RECIPES.value:
            config = importlib.import_module(f"configs.{recipe}").get_config()
            base.set_fields(config, {"model.dtype": dtype})
            for name in _TARGETS.value:
                key = (program_key(config), dtype, name)
                start = time.perf_counter()
                if key not in done:
                    done[key] = plan_compile.plan_training(config, get_target(name))
                r = done[key]
                rows.append({"recipe": recipe, "dtype": dtype, **r, "wall_s": time.perf_counter() - start})
                print(
                    f"{recipe} {dtype} {name}: peak {r['memory']['peak'] / 2**30:.1f} GiB, "
                    f"{'fits' if r['fits'] else 'does not fit'} (remat {r['remat_chosen']})",
                    flush=True,
                )
    out = common.write_json(_OUT.value or common.default_out("plan_recipes", False), {"rows": rows})
    print(
        "\n| recipe | dtype | target | images per device | attention | remat (auto) | peak GiB per device | usable GiB | fits |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['recipe']} | {r['dtype']} | {r['target']} | {r['images_per_device']} | {r['attention']} | "
            f"{r['remat_chosen'] or 'none fits'} | {r['memory']['peak'] / 2**30:.1f} | {r['limit_bytes'] / 2**30:.1f} | "
            f"{'yes' if r['fits'] else '**no**'} |"
        )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    program.run(main)
