"""Evaluation speed on this machine: feature extraction (images/s), k-means (seconds per million patches; the plain
one and CBFE's spherical one), and the overclustering of a VOC-val-sized feature set (1,440 images x 32x32
patches, K=500, 5 seeds).

    python bench/evaluation.py            # full sizes (ViT-S/14 at 448, 1.47M patches); for an accelerator
    python bench/evaluation.py --small    # tiny sizes that finish in a minute on 2 CPU cores (CI)

Prints a table and writes bench/results/evaluation_<platform>[_small].json. Random weights and random
features: timings only, no accuracy.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from absl import flags

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from evaluation.features import FeatureExtractor  # noqa: E402
from evaluation.kmeans import kmeans  # noqa: E402
from evaluation.overcluster import OverclusterSettings, cluster_features  # noqa: E402
from neco_jax import program  # noqa: E402
from neco_jax.models import VisionTransformer, get_arch  # noqa: E402

FULL = {
    "arch": "vit_small_patch14_dinov2",
    "image_size": 448,
    "batch": 64,
    "batches": 10,
    "kmeans_points": 1_474_560,
    "kmeans_ks": (21, 300, 500),
    "cbfe_k": 200,
    "iters": 100,
    "restarts": 5,
    "voc_images": 1440,
    "grid": 32,
    "dim": 384,
    "voc_ks": (21, 300, 500),
    "seeds": 5,
}
SMALL = {
    "arch": "vit_tiny_test",
    "image_size": 56,
    "batch": 8,
    "batches": 3,
    "kmeans_points": 20_000,
    "kmeans_ks": (21, 100),
    "cbfe_k": 50,
    "iters": 10,
    "restarts": 2,
    "voc_images": 40,
    "grid": 8,
    "dim": 64,
    "voc_ks": (21, 100),
    "seeds": 2,
}


def bench_features(s: dict, dtype: str) -> dict:
    model = VisionTransformer(get_arch(s["arch"]), rngs=nnx.Rngs(0))
    extractor = FeatureExtractor(model, dtype=dtype)
    images = np.random.default_rng(0).normal(size=(s["batch"], s["image_size"], s["image_size"], 3)).astype(np.float32)
    start = time.perf_counter()
    extractor(images)  # compile
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(s["batches"]):
        extractor(images)
    elapsed = time.perf_counter() - start
    return {
        "what": f"features {s['arch']} {s['image_size']}px {dtype}",
        "batch": s["batch"],
        "images_per_s": s["batch"] * s["batches"] / elapsed,
        "compile_s": compile_s,
    }


def bench_kmeans(s: dict, k: int, max_points_per_centroid: int, spherical: bool = False) -> dict:
    x = np.random.default_rng(1).normal(size=(s["kmeans_points"], 50)).astype(np.float32)
    run = lambda: kmeans(  # noqa: E731
        x,
        k,
        iters=s["iters"],
        restarts=s["restarts"],
        seed=0,
        max_points_per_centroid=max_points_per_centroid,
        spherical=spherical,
    )
    run()  # compile
    start = time.perf_counter()
    run()
    elapsed = time.perf_counter() - start
    trained = min(s["kmeans_points"], k * max_points_per_centroid) if max_points_per_centroid else s["kmeans_points"]
    return {
        "what": f"{'spherical ' if spherical else ''}k-means K={k} iters={s['iters']} restarts={s['restarts']} "
        f"trained on {trained:,} pts",
        "points": s["kmeans_points"],
        "seconds": elapsed,
        "seconds_per_million": elapsed / s["kmeans_points"] * 1e6,
    }


def bench_overcluster(s: dict) -> dict:
    rng = np.random.default_rng(2)
    n, g, d = s["voc_images"], s["grid"], s["dim"]
    feats = rng.normal(size=(n, g, g, d)).astype(np.float32)
    masks = rng.integers(0, 21, size=(n, 100, 100)).astype(np.uint8)
    seeds = tuple(range(s["seeds"]))
    settings = OverclusterSettings(ks=s["voc_ks"], seeds=seeds, iters=s["iters"], restarts=s["restarts"])
    start = time.perf_counter()
    cluster_features(feats, masks, num_classes=21, ignore_index=255, settings=settings)
    elapsed = time.perf_counter() - start
    return {
        "what": f"overcluster {n} images {g}x{g}x{d}, K={s['voc_ks']}, {s['seeds']} seeds (incl. compile)",
        "points": n * g * g,
        "seconds": elapsed,
    }


_SMALL = flags.DEFINE_bool("small", False, "Tiny sizes for CI / CPU.")


def main(argv: list[str]) -> None:
    program.flags_only(argv)
    s = SMALL if _SMALL.value else FULL
    platform = jax.devices()[0].platform
    rows = [bench_features(s, "float32"), bench_features(s, "bfloat16")]
    rows += [bench_kmeans(s, k, 256) for k in s["kmeans_ks"]]
    rows.append(bench_kmeans(s, s["kmeans_ks"][-1], 0))
    rows.append(bench_kmeans(s, s["cbfe_k"], 256, spherical=True))  # CBFE's clustering of all patches
    rows.append(bench_overcluster(s))
    for r in rows:
        shown = (f"{k}={v:,.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items() if k != "what")
        figures = "  ".join(shown)
        print(f"{r['what']:<70} {figures}")
    out = REPO / "bench" / "results" / f"evaluation_{platform}{'_small' if _SMALL.value else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    device = jax.devices()[0].device_kind
    out.write_text(json.dumps({"device": device, "devices": jax.device_count(), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    program.run(main)
