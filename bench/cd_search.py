"""Cost of the CBFE + CD hyper-parameter search at VOC size: the once-per-k work and one trial.

    python bench/cd_search.py            # VOC train + val (1,464 + 1,449 maps of 100x100), NeCo's 19 k (69..249)
    python bench/cd_search.py --small    # 60 maps, two k values (CI)

The once-per-k work timed here is the co-occurrence graph and the confusion counts (``community_inputs``); the
k-means that makes the maps runs on the accelerator and is timed by bench/evaluation.py. Wall and CPU seconds
are both given: on a shared machine the CPU seconds are the fairer figure.

Synthetic but structured maps (objects made of a class's own clusters, in blocks as nearest-upsampled patch
grids), so the co-occurrence graph and Infomap see a realistic number of edges. Host-only work (NumPy,
Infomap): the accelerator does not change these numbers. Prints a table and writes JSON.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

from absl import flags

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from evaluation import cd_search  # noqa: E402
from neco_jax import program  # noqa: E402

FULL = {
    "n_train": 1464,
    "n_val": 1449,
    "ks": tuple(cd_search.grid(*cd_search.SEARCH_SPACE["k_community"])),
    "trials": 5,
}
SMALL = {"n_train": 30, "n_val": 30, "ks": (29, 49), "trials": 4}


def synthetic_maps(n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, 100, 100) fine-cluster maps (background = label k) and their 21-class ground truth (void on edges)."""
    rng = np.random.default_rng(seed)
    gt = np.zeros((n, 100, 100), np.uint8)
    for i in range(n):
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, 70, size=2)
            h, w = rng.integers(15, 45, size=2)
            gt[i, y : y + h, x : x + w] = rng.integers(1, 21)
    per_class = -(-k // 20)  # every label 0..k-1 used
    sub = np.repeat(np.repeat(rng.integers(0, per_class, size=(n, 34, 34)), 3, 1), 3, 2)[:, :100, :100]
    maps = np.where(gt == 0, k, ((gt.astype(np.int64) - 1) * per_class + sub) % k)
    edge = (gt != np.roll(gt, 1, 1)) | (gt != np.roll(gt, 1, 2))
    return maps, np.where(edge, 255, gt).astype(np.uint8)


_SMALL = flags.DEFINE_bool("small", False, "Tiny sizes for CI.")
_OUT = flags.DEFINE_string("out", None, "JSON path (default bench/results/cd_search[_small].json).")


def main(argv: list[str]) -> None:
    program.flags_only(argv)
    s = SMALL if _SMALL.value else FULL
    rows = []
    n_train = s["n_train"]
    for k in s["ks"]:
        maps, gt = synthetic_maps(n_train + s["n_val"], k)
        start, cpu = time.perf_counter(), time.process_time()
        inputs = cd_search.community_inputs(maps, n_train, gt[:n_train], gt[n_train:], k)
        prepare_s, prepare_cpu_s = time.perf_counter() - start, time.process_time() - cpu
        rng = np.random.default_rng(k)
        times, completed = [], 0
        for _ in range(s["trials"]):
            mt = float(rng.choice(cd_search.grid(0.1, 2.0, 0.1)))
            wt = float(rng.choice(cd_search.grid(0.01, 0.1, 0.01)))
            start = time.perf_counter()
            try:
                cd_search.train_objective(
                    inputs, markov_time=mt, weight_threshold=wt, num_runs=10, preferred_modules=20
                )
                completed += 1
            except cd_search.InvalidTrial:
                pass
            times.append(time.perf_counter() - start)
        rows.append(
            {
                "k": k,
                "maps": len(maps),
                "prepare_s": prepare_s,
                "prepare_cpu_s": prepare_cpu_s,
                "trial_median_s": statistics.median(times),
                "trial_max_s": max(times),
                "trials": len(times),
                "completed": completed,
            }
        )
    print(
        common.format_table(
            rows,
            [
                ("k", "k"),
                ("maps", "maps"),
                ("prepare_s", "once per k (s)"),
                ("prepare_cpu_s", "CPU (s)"),
                ("trial_median_s", "trial median (s)"),
                ("trial_max_s", "trial max (s)"),
                ("completed", "completed"),
                ("trials", "trials"),
            ],
        )
    )
    total = {key: sum(r[key] for r in rows) for key in ("prepare_s", "prepare_cpu_s")}
    print(f"once-per-k work over {len(rows)} k: {total['prepare_s']:.1f} s, CPU {total['prepare_cpu_s']:.1f} s")
    out = _OUT.value or common.default_out("cd_search", _SMALL.value)
    summary = {"small": _SMALL.value, "device": common.device_summary(), "rows": rows, "once_per_k_total": total}
    common.write_json(out, summary)
    print(f"wrote {out}")


if __name__ == "__main__":
    program.run(main)
