"""Feature-extraction throughput: images/s of the backbone forward (final-norm patch tokens) for DINOv2
ViT-S/14 and ViT-B/14 at 448 and 518 px, fp32 and bf16 compute, random weights and random images.

    python bench/forward.py              # accelerator sizes
    python bench/forward.py --small      # CPU / CI: the tiny test arch at 56 px
    python bench/forward.py --small --arch vit_small_patch14_dinov2 --size 518 --batch 1   # one case, CPU
Prints a table and writes bench/results/forward[_small].json (folder: $BENCH_RESULTS_DIR if set).
"""

from __future__ import annotations

import itertools
import os
import sys
import time

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from bench.flops import vit_forward_macs  # noqa: E402
from neco_jax import program  # noqa: E402
from neco_jax.models import VisionTransformer, get_arch  # noqa: E402

FULL = {
    "archs": ("vit_small_patch14_dinov2", "vit_base_patch14_dinov2"),
    "sizes": (448, 518),
    "batch": 64,
    "warmup": 2,
    "iters": 10,
}
SMALL = {"archs": ("vit_tiny_test",), "sizes": (56,), "batch": 2, "warmup": 1, "iters": 3}
# (compute dtype, ViTConfig.attention), most useful first: gpu_check.sh cuts the tail when time runs out. "auto" is
# what the model runs by default; "xla" the plain path that keeps the N x N scores.
VARIANTS = (("bfloat16", "auto"), ("bfloat16", "xla"), ("float32", "auto"), ("float32", "xla"))
SMALL_VARIANTS = (("bfloat16", "auto"), ("float32", "auto"), ("float32", "xla"), ("float32", "chunked"))
COLUMNS = (
    ("arch", "arch"),
    ("size", "px"),
    ("dtype", "dtype"),
    ("attention", "attention"),
    ("status", "status"),
    ("batch", "batch"),
    ("images_per_s", "img/s"),
    ("median_ms", "ms/batch"),
    ("tflops_per_s", "TFLOP/s"),
    ("mfu", "MFU"),
    ("compile_s", "compile s"),
    ("program", "program"),
)


def bench_case(
    arch: str, size: int, dtype: str, attention: str, batch: int, warmup: int, iters: int, peak: float | None
) -> dict:
    cfg = get_arch(arch, dtype=dtype, attention=attention)
    model = VisionTransformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)["x_norm_patchtokens"])
    # Two different random batches, alternated, so no call reuses the previous one's inputs.
    keys = jax.random.split(jax.random.key(size), 2)
    inputs = [jax.random.normal(k, (batch, size, size, 3), jnp.float32) for k in keys]
    start = time.perf_counter()
    compiled = forward.lower(params, inputs[0]).compile()
    jax.block_until_ready(compiled(params, inputs[0]))
    compile_s = time.perf_counter() - start
    forward = compiled
    cycle = itertools.cycle(inputs)
    timing = common.time_calls(lambda: forward(params, next(cycle)), warmup=warmup, iters=iters)
    flops = 2.0 * vit_forward_macs(cfg, size) * batch
    per_s = flops / timing["median_s"]
    return {
        "arch": arch,
        "size": size,
        "dtype": dtype,
        "attention": attention,
        "status": "ok",
        "batch": batch,
        "compile_s": compile_s,
        "program": common.program_id(compiled),
        "images_per_s": batch / timing["median_s"],
        "median_ms": 1e3 * timing["median_s"],
        "gflops_per_image": flops / batch / 1e9,
        "tflops_per_s": per_s / 1e12,
        "mfu": None if peak is None else per_s / peak,
        **timing,
    }


_SMALL = flags.DEFINE_bool("small", False, "CPU/CI run: tiny arch, small images, few calls.")
_BATCH = flags.DEFINE_integer("batch", None, "Images per call (default: the plan's).")
_ARCH = flags.DEFINE_string("arch", None, "One architecture instead of the plan's (e.g. the tests' sizes).")
_SIZE = flags.DEFINE_integer("size", None, "One image side instead of the plan's.")
_ITERS = flags.DEFINE_integer("iters", None, "Timed calls per case.")
_BUDGET_S = flags.DEFINE_float("budget_s", None, "Start no new case after this many seconds.")
_OUT = flags.DEFINE_string("out", None, "JSON path (default bench/results/forward[_small].json).")


def main(argv: list[str]) -> None:
    program.flags_only(argv)
    plan = dict(SMALL if _SMALL.value else FULL)
    plan["archs"] = (_ARCH.value,) if _ARCH.value else plan["archs"]
    plan["sizes"] = (_SIZE.value,) if _SIZE.value else plan["sizes"]
    batch, iters = _BATCH.value or plan["batch"], _ITERS.value or plan["iters"]
    device = common.device_summary()
    peak = None if device["bf16_peak_tflops"] is None else device["bf16_peak_tflops"] * 1e12
    print(
        f"device: {device['device_kind']} ({device['platform']}), bf16 peak "
        f"{common.fmt(device['bf16_peak_tflops'])} TFLOP/s, jax {device['jax']}",
        flush=True,
    )
    rows, start = [], time.perf_counter()
    variants = SMALL_VARIANTS if _SMALL.value else VARIANTS
    for (dtype, attention), arch, size in itertools.product(variants, plan["archs"], plan["sizes"]):
        what = f"{arch} {size}px {dtype} attention={attention}"
        if _BUDGET_S.value is not None and time.perf_counter() - start > _BUDGET_S.value:
            rows.append(
                {
                    "arch": arch,
                    "size": size,
                    "dtype": dtype,
                    "attention": attention,
                    "status": "skipped: time budget spent",
                }
            )
            print(f"  {what}: skipped (time budget)", flush=True)
            continue
        try:
            row = bench_case(arch, size, dtype, attention, batch, plan["warmup"], iters, peak)
        except Exception as err:  # noqa: BLE001 - an OOM or an unavailable kernel is a result, not a crash
            row = {
                "arch": arch,
                "size": size,
                "dtype": dtype,
                "attention": attention,
                "status": f"error: {type(err).__name__}",
                "error": str(err)[:300],
            }
        rows.append(row)
        print(
            f"  {what}: {row['status']}" + (f", {row['images_per_s']:.1f} img/s" if row["status"] == "ok" else ""),
            flush=True,
        )
    out = common.write_json(
        _OUT.value or common.default_out("forward", _SMALL.value),
        {"bench": "forward", "small": _SMALL.value, "device": device, "rows": rows},
    )
    print("\nFeature extraction (forward, final-norm patch tokens), MFU vs the bf16 peak:")
    print(common.format_table(rows, COLUMNS))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    program.run(main)
