"""Speed and peak memory of the differentiable sort: gather vs dense-matmul executor.

Prints a table (rows x n, forward and forward+backward time, peak memory) and writes JSON to
bench/results/. 3136 x 49 is one NeCo pair at batch 64. ``--small`` runs tiny sizes in seconds (CI).

    python bench/sorting.py [--small] [--network=bitonic] [--repeats=5]
"""

from __future__ import annotations

import json
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from neco_jax import program, sorting  # noqa: E402

FULL_SIZES = [(392, 49), (3136, 49), (31360, 49), (3136, 64)]
SMALL_SIZES = [(64, 16), (392, 49)]


def _peak_bytes(compiled) -> int | None:
    """Peak temporary + output bytes from XLA's memory analysis (None where the backend gives none)."""
    try:
        m = compiled.memory_analysis()
        return int(m.temp_size_in_bytes + m.output_size_in_bytes + m.argument_size_in_bytes)
    except Exception:  # noqa: BLE001  (backends without analysis)
        return None


def _time(fn, x, repeats: int) -> tuple[float, int | None, float]:
    compiled = jax.jit(fn).lower(x).compile()
    start = time.perf_counter()
    jax.block_until_ready(compiled(x))
    compile_and_first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(x))
        times.append(time.perf_counter() - start)
    return float(np.median(times)), _peak_bytes(compiled), compile_and_first


def run(sizes, network: str, repeats: int) -> list[dict]:
    results = []
    for rows, n in sizes:
        x = jax.random.uniform(jax.random.PRNGKey(0), (rows, n), jnp.float32, -0.2, 0.2)
        w = jax.random.normal(jax.random.PRNGKey(1), (rows, n, n), jnp.float32)
        for executor in sorting.EXECUTORS:

            def forward(x, executor=executor):
                return sorting.sort(x, network=network, steepness=100.0, executor=executor)[1]

            def forward_backward(x, forward=forward, w=w):
                return jax.grad(lambda x: jnp.sum(forward(x) * w))(x)

            fwd_s, fwd_mem, _ = _time(forward, x, repeats)
            bwd_s, bwd_mem, _ = _time(forward_backward, x, repeats)
            row = dict(
                rows=rows,
                n=n,
                network=network,
                executor=executor,
                fwd_ms=fwd_s * 1e3,
                fwd_bwd_ms=bwd_s * 1e3,
                fwd_peak_mb=None if fwd_mem is None else fwd_mem / 2**20,
                fwd_bwd_peak_mb=None if bwd_mem is None else bwd_mem / 2**20,
            )
            results.append(row)
            print(f"  done {rows}x{n} {executor}", file=sys.stderr, flush=True)
    return results


def _fmt(v):
    return "n/a" if v is None else f"{v:.1f}"


_SMALL = flags.DEFINE_bool("small", False, "Tiny sizes only (seconds; for CI and CPU).")
_NETWORK = flags.DEFINE_enum("network", "bitonic", list(sorting.NETWORKS), "Sorting network.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per size.")


def main(argv: list[str]) -> None:
    program.flags_only(argv)
    device = jax.devices()[0]
    results = run(SMALL_SIZES if _SMALL.value else FULL_SIZES, _NETWORK.value, _REPEATS.value)
    header = f"{'rows x n':>10} {'executor':>8} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd MB':>8} {'fwd+bwd MB':>11}"
    print(f"sort ({_NETWORK.value}, cauchy, steepness 100) on {device.device_kind} ({device.platform})")
    print(header)
    for r in results:
        print(
            f"{str(r['rows']) + ' x ' + str(r['n']):>10} {r['executor']:>8} {r['fwd_ms']:>9.2f} "
            f"{r['fwd_bwd_ms']:>11.2f} {_fmt(r['fwd_peak_mb']):>8} {_fmt(r['fwd_bwd_peak_mb']):>11}"
        )
    out_dir = pathlib.Path(__file__).resolve().parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"sorting_{device.platform}_{_NETWORK.value}{'_small' if _SMALL.value else ''}.json"
    out.write_text(
        json.dumps(
            dict(
                device=device.device_kind,
                platform=device.platform,
                host=platform.node(),
                jax=jax.__version__,
                results=results,
            ),
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    program.run(main)
