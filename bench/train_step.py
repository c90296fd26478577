"""NeCo training-step speed on one chip: step time, images/s, model FLOPs, MFU and peak memory, plus the share
of the sorting + ROI-align loss part, for the recipes' shapes with synthetic batches (no input pipeline).

    python bench/train_step.py                       # accelerator cases, most important first
    python bench/train_step.py --small               # CPU / CI: the demo recipe's tiny ViT at 56/28 px
    python bench/train_step.py --small --loop --cases ""   # the demo's training loop vs its step alone
    python bench/train_step.py --small --compile-only      # trace + compile time of each case, nothing run
    python bench/train_step.py --cases s14_518_b64_bf16_auto --isolate --budget-s 360 --profile s14_518_b64_bf16_auto
Cases: the recipes' own defaults first (dinov2_s14 at 518/98, batch 64, and dinov2_b14, batch 16: float32,
model.remat and model.attention "auto"), then dinov2_s14 at 518/98 and 224/98 and dinov2_b14 with fp32 and bf16
compute, with and without rematerialisation, and XLA's plain attention path. The step is the trainer's own (`neco_jax.train.make_train_step`, jitted
by `jit_train_step` with the state donated) on random-init weights. `--isolate` runs each case in a child
process, so the allocator's peak is per case and an out-of-memory case cannot take the others down.
Every case also times the device colour augmentation alone (`augment share` of the step). Prints a table and
writes bench/results/train_step[_small].json (folder: $BENCH_RESULTS_DIR if set).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from bench.flops import matmul_flops, neco_step_flops  # noqa: E402
from configs import base  # noqa: E402
from input_pipeline import augment  # noqa: E402
from input_pipeline.loader import view_config_from  # noqa: E402
from input_pipeline.views import draw_colour_params  # noqa: E402
from neco_jax import memory_fit, sharding, step_feed  # noqa: E402
from neco_jax import train as train_lib  # noqa: E402
from neco_jax import train_state as ts  # noqa: E402
from neco_jax.l2_norm import l2_normalize  # noqa: E402

COCO_TRAIN_IMAGES = 118_287  # the original's 25-epoch COCO run: 25 * (118287 // 64) = 46,200 steps
EPOCHS = 25


@dataclasses.dataclass(frozen=True)
class Case:
    recipe: str  # configs/<recipe>.py
    size_crops: tuple[int, int]
    batch: int
    dtype: str
    remat: str = "none"  # config.model.remat; "auto" as the trainer resolves it against the device's memory
    attention: str = "auto"  # config.model.attention; "xla" is the plain path that keeps the N x N scores

    @property
    def name(self) -> str:
        short = {"float32": "fp32", "bfloat16": "bf16"}[self.dtype]
        recipe = self.recipe.replace("dinov2_", "")
        return (
            f"{recipe}_{self.size_crops[0]}_b{self.batch}_{short}"
            + {"none": "", "full": "_remat", "dots": "_dots", "auto": "_auto"}[self.remat]
            + ("" if self.attention == "auto" else f"_{self.attention}")
        )


def _cases(specs) -> dict[str, Case]:
    cases = [Case(*spec) for spec in specs]
    return {c.name: c for c in cases}


S518, S224 = (518, 98), (224, 98)
# Most important first: gpu_check.sh runs them in this order under a time budget. First each recipe's own default
# config (float32, model.remat and model.attention "auto"): what a user runs.
FULL = _cases(
    [
        ("dinov2_s14", S518, 64, "float32", "auto"),
        ("dinov2_b14", S518, 16, "float32", "auto"),
        ("dinov2_s14", S518, 64, "bfloat16", "auto"),
        ("dinov2_s14", S518, 64, "bfloat16", "full", "xla"),
        ("dinov2_s14", S518, 64, "bfloat16", "full"),
        ("dinov2_b14", S518, 16, "bfloat16", "auto"),
        ("dinov2_s14", S224, 64, "bfloat16"),
        ("dinov2_s14", S224, 64, "float32"),
        ("dinov2_s14", S518, 64, "float32", "full"),
        ("dinov2_b14", S518, 16, "bfloat16", "full"),
        ("dinov2_s14", S224, 64, "bfloat16", "full"),
        ("dinov2_s14", S224, 64, "float32", "full"),
        ("dinov2_b14", S518, 16, "float32", "full"),
    ]
)
SMALL = _cases(
    [
        ("demo", (56, 28), 2, "float32"),
        ("demo", (56, 28), 2, "float32", "none", "xla"),
        ("demo", (56, 28), 2, "float32", "none", "chunked"),
        ("demo", (56, 28), 2, "bfloat16"),
        ("demo", (56, 28), 2, "float32", "full"),
        ("demo", (56, 28), 2, "float32", "auto"),
        ("dinov2_s14", S518, 1, "float32", "full"),
        ("dinov2_s14", S518, 1, "float32"),
        ("dinov2_s14", S518, 1, "float32", "none", "xla"),
    ]
)  # the demo (model.attention "auto", the plain "xla" path, "chunked"), and the recipe's shapes at a CPU batch
COLUMNS = (
    ("case", "case"),
    ("status", "status"),
    ("step_ms", "step ms"),
    ("images_per_s", "img/s"),
    ("model_gflop_per_step", "GFLOP/step"),
    ("mfu", "MFU"),
    ("loss_part_ms", "sort+roi ms"),
    ("loss_share", "sort+roi share"),
    ("forward_share", "fwd share"),
    ("augment_share", "augment share"),
    ("peak_memory_gib", "peak GiB"),
    ("compiled_memory_gib", "XLA GiB"),
    ("hlo_gib_accessed", "HLO GiB moved"),
    ("program", "program"),
    ("coco_25ep_hours", "COCO 25ep h"),
    ("finite", "finite"),
    ("lower_s", "trace s"),
    ("compile_s", "compile s"),
    ("compile_cpu_s", "compile CPU s"),
)


def case_config(case: Case):
    """The recipe's ConfigDict with random init and the case's shapes, dtype and remat."""
    config = importlib.import_module(f"configs.{case.recipe}").get_config()
    return base.set_fields(
        config,
        {
            "model.init": "random",
            "data.size_crops": case.size_crops,
            "optim.batch_size": case.batch,
            "model.dtype": case.dtype,
            "model.remat": case.remat,
            "model.attention": case.attention,
            "optim.total_steps": 1000,
        },
    )


def synthetic_batch(config, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A batch with the input pipeline's keys, shapes and value ranges: random uint8 crops with colour
    parameters drawn as the workers draw them, and overlap boxes inside each crop's frame (a crop's overlap
    with itself is the whole crop)."""
    b = config.optim.batch_size
    (n_g, n_l), (s_g, s_l) = config.data.nmb_samples, config.data.size_crops
    views = n_g + n_l
    sizes = np.array([s_g] * n_g + [s_l] * n_l, np.float32)

    def boxes(frame: np.ndarray) -> np.ndarray:  # frame (..., ) side lengths -> (..., 4) x1, y1, x2, y2
        side = frame[..., None] * rng.uniform(0.3, 1.0, frame.shape + (2,))
        corner = (frame[..., None] - side) * rng.uniform(0.0, 1.0, frame.shape + (2,))
        return np.concatenate([corner, corner + side], axis=-1).astype(np.float32)

    boxes_gc = boxes(np.broadcast_to(sizes[:n_g, None], (b, n_g, views)).copy())
    boxes_all = boxes(np.broadcast_to(sizes[:, None], (b, views, n_g)).copy())
    for g in range(n_g):  # a global crop overlaps itself entirely
        boxes_gc[:, g, g] = boxes_all[:, g, g] = [0, 0, s_g, s_g]
    view_cfg = view_config_from(config.data)
    colour = np.array([draw_colour_params(rng, view_cfg) for _ in range(b * views)], np.float32)
    colour = colour.reshape(b, views, -1)
    return {
        "global_crops": rng.integers(0, 256, (b, n_g, s_g, s_g, 3), np.uint8),
        "local_crops": rng.integers(0, 256, (b, n_l, s_l, s_l, 3), np.uint8),
        "global_colour": colour[:, :n_g],
        "local_colour": colour[:, n_g:],
        "boxes_gc": boxes_gc,
        "boxes_all": boxes_all,
    }


class Built(NamedTuple):
    state: ts.TrainState
    step_fn: Any  # the pure step, (state, batch) -> (state, metrics)
    step: Any  # the same, jitted over the mesh with the state donated
    models: ts.Models
    labels: Any  # optimizer group of every parameter


def build_step(config, mesh) -> Built:
    """The trainer's state and jitted step on random-init weights, built by the trainer's own builders;
    model.remat="auto" resolved as the trainer resolves it (against the devices' memory, where reported)."""
    total_steps = config.optim.total_steps
    student, teacher = train_lib.random_params(config, config.seed)
    models, labels, tx, state = train_lib.build_training(config, total_steps, student, teacher)
    state = jax.device_put(state, sharding.replicated(mesh))
    if config.model.remat == "auto":
        limit = memory_fit.device_limit(mesh.devices.flat)
        fit = train_lib.compile_loop_step(config, total_steps, state, labels, tx, mesh, limit)[0]
        config = train_lib.with_remat(config, fit.remat or "full")
        models = train_lib.build_models(config)
    step_fn = train_lib.make_train_step(config, models, labels, tx, total_steps)
    return Built(state, step_fn, train_lib.jit_train_step(step_fn, mesh), models, labels)


def time_loss_part(config, models, queue, batch, warmup: int, iters: int) -> dict:
    """The step's loss on head features of the step's shapes, forward and backward: ROI-align of both sides,
    the similarities to the references, both sorting networks and the cross-entropy (the part that is not
    backbone or head)."""
    b = config.optim.batch_size
    (n_g, n_l), (s_g, s_l) = config.data.nmb_samples, config.data.size_crops
    p, dim = models.patch_size, config.head.out_dim
    keys = jax.random.split(jax.random.PRNGKey(1), 4)

    def unit(key, shape):
        return l2_normalize(jax.random.normal(key, shape, jnp.float32))

    s_glob = unit(keys[0], (b, n_g, s_g // p, s_g // p, dim))
    s_loc = unit(keys[1], (b, n_l, s_l // p, s_l // p, dim))
    t_glob = unit(keys[2], (b, n_g, s_g // p, s_g // p, dim))

    def loss(sg, sl, tg, queue, batch, key):
        return train_lib.neco_step_loss(config.loss, p, sg, sl, tg, None, batch, queue, key)[0]

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    timing = common.time_calls(lambda: grad(s_glob, s_loc, t_glob, queue, batch, keys[3]), warmup=warmup, iters=iters)
    return {"loss_part_ms": 1e3 * timing["median_s"], "loss_part_timing": timing}


def time_forward_part(config, built: Built, state, batch, warmup: int, iters: int) -> dict:
    """The step's forward alone (student and teacher backbones, heads, loss; no gradients, no update): with the
    step time and the loss part, a coarse profile of where the step's time goes."""
    loss_fn = jax.jit(train_lib.make_loss_fn(config, built.models, built.labels))
    batch = augmented(config)(batch)  # the loss takes the crops the step's augmentation made
    key = jax.random.PRNGKey(2)  # a raw key, as the state.rng the step splits
    timing = common.time_calls(
        lambda: loss_fn(state.student, state.teacher, state.queue, batch, key)[0], warmup=warmup, iters=iters
    )
    return {"forward_ms": 1e3 * timing["median_s"], "forward_timing": timing}


def augmented(config):
    """The step's first part alone, jitted: colour augmentation and normalisation of the uint8 crops."""
    return jax.jit(augment.from_config(config.data))


def time_augment_part(config, batch, warmup: int, iters: int) -> dict:
    """The device colour augmentation alone (all crops of the batch), to weigh it against the step."""
    fn = augmented(config)
    timing = common.time_calls(lambda: fn(batch), warmup=warmup, iters=iters)
    return {"augment_ms": 1e3 * timing["median_s"], "augment_timing": timing}


def run_case(
    case: Case, warmup: int, iters: int, peak: float | None, profile: bool = False, compile_only: bool = False
) -> dict:
    config = case_config(case)
    row = {"case": case.name, **dataclasses.asdict(case), "status": "ok"}
    mesh = sharding.make_mesh(jax.devices()[:1])
    built = build_step(config, mesh)
    state, step_fn, step, models = built.state, built.step_fn, built.step, built.models
    batch = sharding.global_batch(synthetic_batch(config, np.random.default_rng(0)), mesh)
    if profile:  # every matmul XLA is given, sorting and remat recomputation included
        row["matmul_tflop_traced"] = matmul_flops(step_fn, state, batch) / 1e12
    start, start_cpu = time.perf_counter(), time.process_time()
    lowered = step.lower(state, batch)
    row["lower_s"] = time.perf_counter() - start  # tracing and lowering to StableHLO
    compiled = lowered.compile()
    row["compile_s"] = time.perf_counter() - start  # the whole of it: lowering and XLA's compilation
    row["compile_cpu_s"] = time.process_time() - start_cpu  # all threads; steadier on a shared machine
    mem = common.compiled_memory_bytes(compiled)
    row["compiled_memory_gib"] = None if mem is None else mem / 2**30
    row["hlo_gib_accessed"] = common.bytes_accessed(compiled) / 2**30
    row["program"] = common.program_id(compiled)
    if compile_only:
        return row
    holder = {"state": state}

    def call():
        holder["state"], metrics = compiled(holder["state"], batch)
        holder["metrics"] = metrics
        return holder["state"], metrics

    timing = common.time_calls(call, warmup=warmup, iters=iters)
    metrics = jax.device_get(holder["metrics"])
    step_s = timing["median_s"]
    flops = neco_step_flops(config)
    steps_25ep = EPOCHS * (COCO_TRAIN_IMAGES // case.batch)
    row.update(
        step_ms=1e3 * step_s,
        images_per_s=case.batch / step_s,
        model_gflop_per_step=flops / 1e9,
        achieved_tflops=flops / step_s / 1e12,
        mfu=None if peak is None else flops / step_s / peak,
        coco_25ep_steps=steps_25ep,
        coco_25ep_hours=steps_25ep * step_s / 3600,
        step_timing=timing,
        loss=float(metrics["loss"]),
        finite=bool(metrics["finite"]),
    )
    row.update(time_augment_part(config, batch, warmup, iters))
    row["augment_share"] = row["augment_ms"] / row["step_ms"]
    if profile:
        try:
            row.update(time_loss_part(config, models, holder["state"].queue, batch, warmup, iters))
            row["loss_share"] = row["loss_part_ms"] / row["step_ms"]
        except AttributeError as err:  # the trainer's loss entry point moved: keep the step's numbers
            row["loss_part_error"] = repr(err)
        row.update(time_forward_part(config, built, holder["state"], batch, warmup, iters))
        row["forward_share"] = row["forward_ms"] / row["step_ms"]
    mem = common.peak_memory_bytes()
    row["peak_memory_gib"] = None if mem is None else mem / 2**30
    return row


class InMemoryLoader:
    """The training loader's interface over a few batches held in memory, served round robin: the loop then
    pays for everything but reading and decoding."""

    def __init__(self, batches: list[dict], steps_per_epoch: int):
        self.batches, self.steps_per_epoch, self.num_records = batches, steps_per_epoch, len(batches)
        self.next_batch = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        self.next_batch += 1
        return self.batches[(self.next_batch - 1) % len(self.batches)]

    def fetch(self) -> dict:
        return next(self)

    def report(self, batch: dict, state: dict) -> None:
        pass  # nothing is ever skipped

    def get_state(self) -> dict:
        images = self.next_batch * len(self.batches[0]["index"])
        return {"next_batch": self.next_batch, "bad_files": 0, "files_read": images}

    def set_state(self, state: dict) -> None:
        self.next_batch = int(state["next_batch"])

    def close(self) -> None:
        pass


def loop_overhead(windows: int, log_every: int, iters: int) -> dict:
    """The demo recipe's training loop (`train_and_evaluate`, data held in memory) against its jitted step
    alone (the same program, metric sums carried) on the same batch, called back to back. The loop's step time
    is the mean over its log windows after the first (which holds the compilation); the final checkpoint and
    export fall outside every window."""
    from configs import demo
    from input_pipeline import make_train_loader
    from neco_jax.metrics_writer import read_metrics

    config = base.set_fields(
        demo.get_config(),
        {
            "optim.total_steps": windows * log_every,
            "log_every_steps": log_every,
            "checkpoint_every_steps": 10**9,
            "export_at_end": False,
        },
    )
    loader = make_train_loader(config, batch_size=config.optim.batch_size, seed=0, worker_count=0)
    batches = [next(loader) for _ in range(4)]
    loader.close()
    real = train_lib.make_train_loader  # the name the trainer calls
    train_lib.make_train_loader = lambda *a, **k: InMemoryLoader(batches, loader.steps_per_epoch)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            train_lib.train_and_evaluate(config, tmp)
            rows = read_metrics(tmp)
    finally:
        train_lib.make_train_loader = real
    loop_s = float(np.mean([r["step_time_s"] for r in rows[1:]]))
    # The loop's own program: the step with the metric sums carried (the persistent compilation cache, when
    # set, serves it without a second compilation).
    mesh = sharding.make_mesh()
    built = build_step(config, mesh)
    step = train_lib.jit_loop_step(config, built.step_fn, mesh)
    batch = sharding.global_batch(train_lib._device_part(batches[0]), mesh)
    holder = {"state": built.state, "sums": step_feed.empty_sums(0, sharding.replicated(mesh))}

    def call():
        holder["state"], metrics, holder["sums"] = step(holder["state"], batch, holder["sums"])
        return metrics

    timing = common.time_calls(call, warmup=2, iters=iters)
    return {
        "loop_step_ms": 1e3 * loop_s,
        "step_alone_ms": 1e3 * timing["pipelined_mean_s"],
        "step_alone_synced_ms": 1e3 * timing["median_s"],
        "overhead": loop_s / timing["pipelined_mean_s"] - 1,
        "windows": len(rows) - 1,
        "log_every_steps": log_every,
        "batch": config.optim.batch_size,
    }


def run_isolated(name: str, args, remaining_s: float | None) -> tuple[list[dict], dict | None]:
    """One case in a child process (a per-case allocator peak; an OOM or crash stays in the child), killed
    after `remaining_s` (at least a minute; None: no limit). Returns its rows and its device summary."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "case.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--cases", name, "--out", out]
        cmd += ["--small"] if args.small else []
        cmd += ["--iters", str(args.iters)] if args.iters else []
        cmd += ["--profile", args.profile] if args.profile else []
        cmd += ["--compile-only"] if args.compile_only else []
        limit = None if remaining_s is None else max(remaining_s, 60.0)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            return [{"case": name, "status": f"timeout after {limit:.0f} s"}], None
        if proc.returncode != 0 or not os.path.exists(out):
            sys.stdout.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return [{"case": name, "status": f"child exit {proc.returncode}", "error": " | ".join(tail)}], None
        with open(out) as f:
            result = json.load(f)
        return result["rows"], result["device"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="CPU/CI run: the demo recipe's tiny shapes")
    parser.add_argument("--cases", default="all", help=f"comma-separated case names, or 'all' ({', '.join(FULL)})")
    parser.add_argument("--iters", type=int, default=None, help="timed steps per case")
    parser.add_argument("--isolate", action="store_true", help="each case in its own child process")
    parser.add_argument(
        "--profile",
        default="",
        help="comma-separated cases to profile as well: the loss part "
        "(ROI-align + sorting) and the forward alone timed, the step's matmuls counted",
    )
    parser.add_argument(
        "--compile-only", action="store_true", help="only trace and compile each case's step (no step is run)"
    )
    parser.add_argument("--budget-s", type=float, default=None, help="start no new case after this many seconds")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/train_step[_small].json)")
    parser.add_argument(
        "--loop",
        action="store_true",
        help="also time the demo's training loop (data in memory) against its jitted step alone (not with --isolate)",
    )
    args = parser.parse_args()
    plan = SMALL if args.small else FULL
    names = list(plan) if args.cases == "all" else [n for n in args.cases.split(",") if n]
    unknown = [n for n in names if n not in plan]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {', '.join(plan)}")
    warmup, iters = (1, args.iters or 2) if args.small else (3, args.iters or 10)
    # With --isolate this process never touches the accelerator: JAX would take most of its memory away from
    # the children. The device summary then comes from them.
    device, peak = None, None
    if not args.isolate:
        device = common.device_summary()
        peak = None if device["bf16_peak_tflops"] is None else device["bf16_peak_tflops"] * 1e12
        print(
            f"device: {device['device_kind']} ({device['platform']}), bf16 peak "
            f"{common.fmt(device['bf16_peak_tflops'])} TFLOP/s, jax {device['jax']}",
            flush=True,
        )
    start, rows = time.perf_counter(), []
    for name in names:
        elapsed = time.perf_counter() - start
        if args.budget_s is not None and elapsed > args.budget_s:
            rows.append({"case": name, "status": f"skipped: time budget {args.budget_s:.0f} s spent"})
            continue
        if args.isolate:
            remaining = None if args.budget_s is None else args.budget_s - elapsed + 120
            case_rows, case_device = run_isolated(name, args, remaining)
            rows.extend(case_rows)
            device = device or case_device
        else:
            try:
                profile = name in args.profile.split(",")
                rows.append(run_case(plan[name], warmup, iters, peak, profile, args.compile_only))
            except Exception as err:  # noqa: BLE001 - an OOM or unsupported option is a result, not a crash
                traceback.print_exc()
                rows.append(
                    {
                        "case": name,
                        "status": f"error: {type(err).__name__}",
                        "error": str(err).splitlines()[0][:300] if str(err) else "",
                    }
                )
        r = rows[-1]
        print(
            f"  {name}: {r['status']}"
            + (
                f", {r['step_ms']:.1f} ms/step, {r['images_per_s']:.1f} img/s"
                if "step_ms" in r
                else f", compiled in {r['compile_s']:.1f} s"
                if "compile_s" in r
                else f" {r.get('error', '')}"
            ),
            flush=True,
        )
    loop = None
    if args.loop:
        device = device or common.device_summary()
        loop = loop_overhead(windows=4, log_every=5 if args.small else 10, iters=args.iters or 20)
        print(
            f"  demo loop {loop['loop_step_ms']:.1f} ms/step vs its jitted step alone {loop['step_alone_ms']:.1f} "
            f"ms/step: overhead {100 * loop['overhead']:+.1f}%",
            flush=True,
        )
    out = common.write_json(
        args.out or common.default_out("train_step", args.small),
        {"bench": "train_step", "small": args.small, "device": device, "rows": rows, "loop": loop},
    )
    if device:
        print(
            f"\ndevice: {device['device_kind']} ({device['platform']}), bf16 peak "
            f"{common.fmt(device['bf16_peak_tflops'])} TFLOP/s, jax {device['jax']}"
        )
    print(
        "\nNeCo train step (synthetic batches, one chip); MFU = model FLOPs (bench/flops.py) / step time / "
        "bf16 peak; COCO 25ep h = 25 * (118287 // batch) steps at this step time:"
    )
    print(common.format_table(rows, COLUMNS))
    if loop:
        print(
            f"\nTraining loop (demo recipe, batch {loop['batch']}, data in memory, {loop['windows']} windows of "
            f"{loop['log_every_steps']} steps): {loop['loop_step_ms']:.2f} ms/step; the jitted step alone "
            f"{loop['step_alone_ms']:.2f} ms/step back to back ({loop['step_alone_synced_ms']:.2f} synchronised); "
            f"loop overhead {100 * loop['overhead']:+.1f}%"
        )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
