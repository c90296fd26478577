"""Shared pieces of the accelerator benchmarks: device description, synchronised timing, memory, table and JSON.

Timing follows the usual rules for asynchronous devices: warm-up calls first (compilation, autotuning),
then each timed call is blocked on (`jax.block_until_ready`) so the host clock measures device work, and
the median of many calls is reported with its spread.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from bench.flops import bf16_peak_flops

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_summary() -> dict[str, Any]:
    """What the numbers were measured on: the chip, its bf16 peak (None if unknown), software versions."""
    import flax

    dev = jax.devices()[0]
    peak = bf16_peak_flops(dev.device_kind)
    return {
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "bf16_peak_tflops": None if peak is None else peak / 1e12,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "python": platform.python_version(),
        "host_cpus": os.cpu_count(),
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def time_calls(call: Callable[[], Any], *, warmup: int, iters: int) -> dict[str, float]:
    """Seconds per call of `call()` (which must return its device outputs): median, min, p90 over `iters`
    synchronised calls after `warmup` untimed ones, plus the mean of the same number of back-to-back calls
    synchronised only at the end (what a pipelined loop sees; the launch gaps of `median_s` disappear)."""
    for _ in range(warmup):
        jax.block_until_ready(call())
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(call())
        samples.append(time.perf_counter() - start)
    start = time.perf_counter()
    out = None
    for _ in range(iters):
        out = call()
    jax.block_until_ready(out)
    pipelined = (time.perf_counter() - start) / iters
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "p90_s": float(np.percentile(samples, 90)),
        "pipelined_mean_s": pipelined,
        "iters": iters,
    }


def peak_memory_bytes(device=None) -> int | None:
    """The allocator's peak bytes in use on `device` since the process started (None where the backend
    keeps no statistics, e.g. the CPU). Cumulative: run one case per process for a per-case peak."""
    stats = (device or jax.devices()[0]).memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def compiled_memory_bytes(compiled) -> int | None:
    """XLA's own account of a compiled program's device memory: arguments + outputs + temporaries, less the
    outputs that reuse donated arguments. Per program, so it is comparable across cases in one process."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - backends without the analysis
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def bytes_accessed(compiled) -> float:
    """XLA's cost analysis of a compiled program: bytes its operations read and write (the HLO account of memory
    traffic, the same for every backend's compiler of the program; 0 where the backend gives none)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older JAX: one dict per program
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("bytes accessed", 0.0))


def program_id(compiled) -> str:
    """A short hash of the compiled program's optimised HLO: two cases with the same id ran the same program, so
    the same time up to noise (what a loaded machine's timings cannot show by themselves)."""
    return hashlib.sha1(compiled.as_text().encode()).hexdigest()[:8]


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: n/a for None, fixed decimals for floats."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """Rows of dicts as an aligned text table; `columns` is ((key, header), ...)."""
    cells = [[h for _, h in columns]] + [[fmt(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str, data: dict) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=str)
    return path


def default_out(name: str, small: bool) -> str:
    """bench/results/<name>[_small].json, or $BENCH_RESULTS_DIR/<name>... when gpu_check.sh sets the folder."""
    folder = os.environ.get("BENCH_RESULTS_DIR", RESULTS_DIR)
    return os.path.join(folder, f"{name}_small.json" if small else f"{name}.json")
