"""Every recipe's training step, default and bfloat16, planned for GPUs and TPUs this machine lacks
(`neco_jax.plan`: deviceless compilation, XLA's memory account): the README's table of peak memory per device
and whether it fits, with model.remat="auto" resolved against each target's memory as the trainer resolves it.

    python bench/plan_recipes.py                                   # every recipe, H100 80GB, A100 40GB, TPU v5e-8
    python bench/plan_recipes.py --recipes=dinov2_s14 --targets=h100-80gb --dtypes=float32

Recipes that differ only in their initial weights or learning rates (the same shapes and memory) are compiled once.
Each plan runs `python -m neco_jax.plan --json` in its own process, one after another: a full-size compilation
takes minutes of CPU and several GB of host memory, which the process returns when it ends; its peak resident
memory and CPU time are recorded, and a plan whose process grows past --max_host_gib is stopped and recorded as
such. The JSON (bench/results/plan_recipes.json, or $BENCH_RESULTS_DIR) is rewritten after every plan, and
--resume keeps the plans it already holds, so a stopped run loses nothing. Ends with a Markdown table.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from configs import base  # noqa: E402
from neco_jax import program  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "bench", "results")
GIB = 2**30
TARGETS = ("h100-80gb", "a100-40gb", "tpu-v5e-8")
# Fields that do not change the compiled program: the initial weights and the learning rates.
_NOT_PROGRAM = ("model.init", "optim.lr_")

_RECIPES = flags.DEFINE_list("recipes", list(base.RECIPES), "Recipes (configs/<name>.py).")
_TARGETS = flags.DEFINE_list("targets", list(TARGETS), "Targets (neco_jax.plan.targets).")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes (config.model.dtype).")
_OUT = flags.DEFINE_string("out", None, "JSON path (default bench/results/plan_recipes.json).")
_RESUME = flags.DEFINE_bool("resume", False, "Keep the plans the JSON at --out already holds; compile the rest.")
_MAX_HOST_GIB = flags.DEFINE_float(
    "max_host_gib", 8.0, "Stop a plan whose process holds more host memory than this (GiB resident)."
)


def _flat(config, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = repr(value)
    return out


def program_key(config) -> str:
    """Every config field that can change the compiled step (all but initial weights and learning rates)."""
    fields = {k: v for k, v in _flat(config).items() if not k.startswith(_NOT_PROGRAM)}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _rss(pid: int) -> int:
    """Resident bytes of process `pid` (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def plan_in_process(recipe: str, dtype: str, target: str, max_host: int) -> dict:
    """One `python -m neco_jax.plan --json` run: its result, wall and CPU seconds and peak resident memory, or
    an "error" saying why there is none."""
    cmd = [sys.executable, "-m", "neco_jax.plan", f"--config=configs/{recipe}.py"]
    cmd += [f"--config.model.dtype={dtype}", f"--target={target}", "--json"]
    start, stopped = time.perf_counter(), False
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True)
        while True:  # waited for here (not by Popen) to read the process's own resource usage
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if not stopped and _rss(proc.pid) > max_host:  # before it pushes a shared machine into swap
                stopped = True
                proc.kill()
            time.sleep(0.5)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read().strip()
    run = {
        "wall_s": round(time.perf_counter() - start, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "host_peak_bytes": usage.ru_maxrss * 1024,
    }
    if stopped:
        return {**run, "error": f"stopped: its process held more than {max_host / GIB:.1f} GiB of host memory"}
    if proc.returncode != 0:
        return {**run, "error": f"exit {proc.returncode}: {stderr.splitlines()[-1] if stderr else ''}"}
    return {**run, **json.loads(stdout)["results"][0]}


def _row_line(row: dict) -> str:
    """A Markdown table row of a plan (or of the error that left none)."""
    cells = [row["recipe"], row["dtype"], row["target"]]
    if "error" in row:
        return "| " + " | ".join(cells + [row["error"]] + [""] * 5) + " |"
    tried = ", ".join(f"{t['remat']} {t['peak'] / GIB:.1f}" for t in row["tried"])
    cells += [
        str(row["images_per_device"]),
        row["attention"],
        f"{row['remat_chosen'] or 'none fits'} ({tried})",
        f"{row['memory']['peak'] / GIB:.1f}",
        f"{row['limit_bytes'] / GIB:.1f}",
        "yes" if row["fits"] else "**no**",
        f"{row['wall_s']:.0f} / {row['cpu_s']:.0f}"
        if row["compiled_as"] == row["recipe"]
        else f"= {row['compiled_as']}",
        f"{row['host_peak_bytes'] / GIB:.1f}",
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| recipe | dtype | target | images per device | attention | remat chosen (peak GiB of each tried) | "
    "peak GiB per device | usable GiB | fits | compile wall / CPU s | host GiB |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def main(argv) -> None:
    program.flags_only(argv)
    path = _OUT.value or os.path.join(os.environ.get("BENCH_RESULTS_DIR", RESULTS_DIR), "plan_recipes.json")
    rows = []
    if _RESUME.value and os.path.exists(path):
        with open(path) as f:
            rows = [r for r in json.load(f)["rows"] if "error" not in r]
    done = {(r["program"], r["dtype"], r["target"]): r for r in rows}
    have = {(r["recipe"], r["dtype"], r["target"]) for r in rows}
    print(HEADER, flush=True)
    for row in rows:
        print(_row_line(row), flush=True)
    for dtype in _DTYPES.value:
        for recipe in _RECIPES.value:
            key = program_key(importlib.import_module(f"configs.{recipe}").get_config())
            for target in _TARGETS.value:
                if (recipe, dtype, target) in have:
                    continue
                if (key, dtype, target) not in done:
                    plan = plan_in_process(recipe, dtype, target, int(_MAX_HOST_GIB.value * GIB))
                    done[(key, dtype, target)] = {**plan, "program": key, "compiled_as": recipe}
                row = {**done[(key, dtype, target)], "recipe": recipe, "dtype": dtype, "target": target}
                rows.append(row)
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                with open(path, "w") as f:  # after every plan: a stopped run keeps what it made
                    json.dump({"rows": rows}, f, indent=1)
                print(_row_line(row), flush=True)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    program.run(main)
