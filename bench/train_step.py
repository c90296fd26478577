"""NeCo training-step speed on one chip: step time, images/s, model FLOPs, MFU and peak memory, plus the share
of the sorting + ROI-align loss part, for the recipes' shapes with synthetic batches (no input pipeline).

    python bench/train_step.py                       # accelerator cases, most important first
    python bench/train_step.py --small               # CPU / CI: the demo recipe's tiny ViT at 56/28 px
    python bench/train_step.py --small --loop --cases ""   # the demo's training loop vs its step alone
    python bench/train_step.py --small --compile_only      # trace + compile time of each case, nothing run
    python bench/train_step.py --cases s14_518_b64_bf16_auto --isolate --budget_s=360 --profile s14_518_b64_bf16_auto
Cases: the recipes' own defaults first (dinov2_s14 at 518/98, batch 64, and dinov2_b14, batch 16: float32,
model.remat and model.attention "auto"), then dinov2_s14 at 518/98 and 224/98 and dinov2_b14 with fp32 and bf16
compute, with and without rematerialisation, and XLA's plain attention path. The program timed is the one the
training loop runs (`neco_jax.step.lower_loop_step`: the trainer's step with its metric sums, state donated) on
random-init weights. `--isolate` runs each case in a child process, so the allocator's peak is per case and an
out-of-memory case cannot take the others down.
Every case also times the device colour augmentation alone (`augment share` of the step). Prints a table and
writes bench/results/train_step[_small].json (folder: $BENCH_RESULTS_DIR if set).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from bench.flops import matmul_flops, neco_step_flops  # noqa: E402
from bench.step_cases import FULL, SMALL, Built, Case, build_step, case_config, synthetic_batch  # noqa: E402
from configs import base  # noqa: E402
from input_pipeline import augment  # noqa: E402
from neco_jax import loss as loss_lib  # noqa: E402
from neco_jax import program, sharding  # noqa: E402
from neco_jax import step as step_lib  # noqa: E402
from neco_jax import train as train_lib  # noqa: E402
from neco_jax.errors import UserError  # noqa: E402
from neco_jax.l2_norm import l2_normalize  # noqa: E402
from neco_jax.precision import true_float32  # noqa: E402
from neco_jax.settings import from_config  # noqa: E402

COCO_TRAIN_IMAGES = 118_287  # the original's 25-epoch COCO run: 25 * (118287 // 64) = 46,200 steps
EPOCHS = 25


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

    settings = from_config(config).loss

    def loss(sg, sl, tg, queue, batch, key):
        boxes = (batch["boxes_gc"], batch["boxes_all"])
        return loss_lib.neco_loss((sg, sl, tg), boxes, queue or None, key, settings, patch_size=p)[0]

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    timing = common.time_calls(lambda: grad(s_glob, s_loc, t_glob, queue, batch, keys[3]), warmup=warmup, iters=iters)
    return {"loss_part_ms": 1e3 * timing["median_s"], "loss_part_timing": timing}


def time_forward_part(config, built: Built, state, batch, warmup: int, iters: int) -> dict:
    """The step's forward alone (student and teacher backbones, heads, loss; no gradients, no update): with the
    step time and the loss part, a coarse profile of where the step's time goes."""
    loss_fn = jax.jit(step_lib.make_loss_fn(built.settings, built.training.models, built.training.labels))
    batch = augmented(config)(batch)  # the loss takes the crops the step's augmentation made
    key = jax.random.PRNGKey(2)  # a raw key, as the state.rng the step splits
    timing = common.time_calls(
        lambda: loss_fn(state.student, state.teacher, state.queue, batch, key)[0], warmup=warmup, iters=iters
    )
    return {"forward_ms": 1e3 * timing["median_s"], "forward_timing": timing}


def augmented(config):
    """The step's first part alone, jitted: colour augmentation and normalisation of the uint8 crops."""
    return jax.jit(functools.partial(augment.apply_batch, views=from_config(config).views))


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
    state, sched = built.training.state, built.training.schedules
    start, start_cpu = time.perf_counter(), time.process_time()
    lowered = built.lower(mesh)
    row["lower_s"] = time.perf_counter() - start  # tracing and lowering to StableHLO
    compiled = lowered.compile()
    row["compile_s"] = time.perf_counter() - start  # the whole of it: lowering and XLA's compilation
    row["compile_cpu_s"] = time.process_time() - start_cpu  # all threads; steadier on a shared machine
    mem = common.compiled_memory_bytes(compiled)
    row["compiled_memory_gib"] = None if mem is None else mem / 2**30
    row["hlo_gib_accessed"] = common.bytes_accessed(compiled) / 2**30
    row["program"] = common.program_id(compiled)
    batch = sharding.global_batch(synthetic_batch(config, np.random.default_rng(0)), mesh)
    if profile:  # every matmul XLA is given, sorting and remat recomputation included
        row["matmul_tflop_traced"] = matmul_flops(built.step_fn(), state, batch, sched) / 1e12
    if compile_only:
        return row
    holder = {"state": state, "sums": built.sums}

    def call():
        holder["state"], metrics, holder["sums"] = compiled(holder["state"], batch, holder["sums"], sched)
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
            row.update(time_loss_part(config, built.training.models, holder["state"].queue, batch, warmup, iters))
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
    settings = from_config(config)
    loader = make_train_loader(
        settings.views, dataclasses.replace(settings.loader, num_workers=0), batch_size=config.optim.batch_size, seed=0
    )
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
    # The loop's own program (the step with the metric sums carried), compiled as the trainer compiles it: this
    # process's executable from the run above, without a second compilation.
    mesh = sharding.make_mesh()
    built = build_step(config, mesh)
    step = built.compile(mesh)
    batch = sharding.global_batch(step_lib.device_part(batches[0]), mesh)
    sched = built.training.schedules
    holder = {"state": built.training.state, "sums": built.sums}

    def call():
        holder["state"], metrics, holder["sums"] = step(holder["state"], batch, holder["sums"], sched)
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


_SMALL = flags.DEFINE_bool("small", False, "CPU/CI run: the demo recipe's tiny shapes.")
_CASES = flags.DEFINE_list("cases", ["all"], f"Comma-separated case names, or 'all' ({', '.join(FULL)}).")
_ITERS = flags.DEFINE_integer("iters", None, "Timed steps per case.")
_ISOLATE = flags.DEFINE_bool("isolate", False, "Each case in its own child process.")
_PROFILE = flags.DEFINE_list(
    "profile",
    [],
    "Comma-separated cases to profile as well: the loss part (ROI-align + sorting) and the forward alone timed, "
    "the step's matmuls counted.",
)
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False, "Only trace and compile each case's step (no step is run).")
_BUDGET_S = flags.DEFINE_float("budget_s", None, "Start no new case after this many seconds.")
_OUT = flags.DEFINE_string("out", None, "JSON path (default bench/results/train_step[_small].json).")
_LOOP = flags.DEFINE_bool(
    "loop",
    False,
    "Also time the demo's training loop (data in memory) against its jitted step alone (not with --isolate).",
)
_LOOP_EVERY = flags.DEFINE_integer(
    "loop_every", None, "--loop: steps per timed window (its log period; default 5 with --small, else 10)."
)


def run_isolated(name: str, remaining_s: float | None) -> tuple[list[dict], dict | None]:
    """One case in a child process (a per-case allocator peak; an OOM or crash stays in the child), killed
    after `remaining_s` (at least a minute; None: no limit). Returns its rows and its device summary."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "case.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--cases", name, "--out", out]
        cmd += ["--small"] if _SMALL.value else []
        cmd += [f"--iters={_ITERS.value}"] if _ITERS.value else []
        cmd += [f"--profile={','.join(_PROFILE.value)}"] if _PROFILE.value else []
        cmd += ["--compile_only"] if _COMPILE_ONLY.value else []
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


@true_float32  # every step traced as the trainer traces it: float32 matmuls at full precision, GPUs included
def main(argv: list[str]) -> None:
    program.flags_only(argv)
    plan = SMALL if _SMALL.value else FULL
    names = list(plan) if _CASES.value == ["all"] else [n for n in _CASES.value if n]
    unknown = [n for n in names if n not in plan]
    if unknown:
        raise UserError(f"--cases: unknown case(s) {unknown}; known: {', '.join(plan)}")
    warmup, iters = (1, _ITERS.value or 2) if _SMALL.value else (3, _ITERS.value or 10)
    # With --isolate this process never touches the accelerator: JAX would take most of its memory away from
    # the children. The device summary then comes from them.
    device, peak = None, None
    if not _ISOLATE.value:
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
        if _BUDGET_S.value is not None and elapsed > _BUDGET_S.value:
            rows.append({"case": name, "status": f"skipped: time budget {_BUDGET_S.value:.0f} s spent"})
            continue
        if _ISOLATE.value:
            remaining = None if _BUDGET_S.value is None else _BUDGET_S.value - elapsed + 120
            case_rows, case_device = run_isolated(name, remaining)
            rows.extend(case_rows)
            device = device or case_device
        else:
            try:
                profile = name in _PROFILE.value
                rows.append(run_case(plan[name], warmup, iters, peak, profile, _COMPILE_ONLY.value))
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
    if _LOOP.value:
        device = device or common.device_summary()
        every = _LOOP_EVERY.value or (5 if _SMALL.value else 10)
        loop = loop_overhead(windows=4, log_every=every, iters=_ITERS.value or 20)
        print(
            f"  demo loop {loop['loop_step_ms']:.1f} ms/step vs its jitted step alone {loop['step_alone_ms']:.1f} "
            f"ms/step: overhead {100 * loop['overhead']:+.1f}%",
            flush=True,
        )
    out = common.write_json(
        _OUT.value or common.default_out("train_step", _SMALL.value),
        {"bench": "train_step", "small": _SMALL.value, "device": device, "rows": rows, "loop": loop},
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
    program.run(main)
