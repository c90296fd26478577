"""The explorer page at its target size: HTML size and the page's own time for one similarity update in headless
Chromium (targets: at most 15 MB and 50 ms for 24 images at 448 px and two ViT-S/14 models), per number of
principal axes kept, with the cosine error that reduction costs.

    python bench/explore.py              # 24 images at 448 px, two random-init DINOv2 ViT-S/14
    python bench/explore.py --small      # CPU / CI: 3 images at 112 px, two random-init tiny test ViTs

The images are the bundled photos (input_pipeline/sample_data.py): the nine of them, then mirrored, then their
centre crops, up to the count. The features are computed once per model; each row encodes them with its number of
axes, renders the page and opens it in headless Chromium with `#bench=N` (three times, each in a fresh browser),
which times N updates at query patches spread over every image: the JavaScript of one update (similarities of
every shown model, the colour scale, every overlay and mark, and the page layout; not the paint after it), split
into its parts. Beside it the CPU time of every Chromium process per update (a run with N + 1 updates minus a run
with 1), which a busy machine inflates less than the page's clock, and the load average. Prints a table and
writes bench/results/explore[_small].json (folder: $BENCH_RESULTS_DIR if set).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np
from absl import flags
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import browser, common  # noqa: E402
from evaluation.explore import data, page  # noqa: E402
from input_pipeline.sample_data import sample_image_paths  # noqa: E402
from neco_jax import program  # noqa: E402
from neco_jax.errors import UserError  # noqa: E402
from neco_jax.models import VisionTransformer, get_arch  # noqa: E402

FULL = {
    "arch": "vit_small_patch14_dinov2",
    "images": 24,
    "size": 448,
    "dims": (32, 64, 128, 192),
    "updates": 50,
    "repeats": 3,
}
SMALL = {"arch": "vit_tiny_test", "images": 3, "size": 112, "dims": (16,), "updates": 5, "repeats": 1}
COLUMNS = (
    ("dims", "dims"),
    ("html_mb", "HTML MB"),
    ("features_mb", "features MB"),
    ("retained", "energy kept"),
    ("error_mean", "cos err mean"),
    ("error_max", "cos err max"),
    ("render_s", "encode+render s"),
    ("first_update_ms", "1st update ms"),
    ("median_update_ms", "update ms median"),
    ("min_update_ms", "min"),
    ("max_update_ms", "max"),
    ("median_similarities_ms", "of it: cosines"),
    ("median_drawing_ms", "drawing"),
    ("median_layout_ms", "layout"),
    ("cpu_update_ms", "CPU ms/update"),
    ("load_average", "load"),
)
PARTS = ("similarities", "drawing", "layout")


def bundled_images(count: int) -> list[data.ExploreImage]:
    """The bundled photos, then the same mirrored, then their centre crops (3/4 of each side), up to `count`."""
    photos = [data.read_image(os.path.basename(p), p) for p in sample_image_paths()]
    variants = list(photos)
    variants += [data.ExploreImage(f"{p.name} (mirrored)", np.ascontiguousarray(p.pixels[:, ::-1])) for p in photos]
    for p in photos:
        h, w = p.pixels.shape[:2]
        crop = p.pixels[h // 8 : h - h // 8, w // 8 : w - w // 8]
        variants.append(data.ExploreImage(f"{p.name} (centre crop)", np.ascontiguousarray(crop)))
    return variants[:count]


def page_row(images, features, names, spec, dims, folder) -> dict:
    t0 = time.perf_counter()
    models = [data.encode_features(name, f, dims) for name, f in zip(names, features)]
    explorer = data.Explorer(images, models, spec["size"], get_arch(spec["arch"]).patch_size, top_k=5)
    html_text = page.render(explorer)
    render_s = time.perf_counter() - t0
    path = os.path.join(folder, f"explore_{dims}.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(html_text)
    h, w = explorer.grid
    timed = time_page(path, f"image=0&patch={h // 2},{w // 2}&bench=", spec["updates"], spec["repeats"])
    return {
        "dims": models[0].dims,
        "html_mb": os.path.getsize(path) / 1e6,
        "features_mb": sum(m.codes.nbytes for m in models) * 4 / 3 / 1e6,  # base64
        "retained": min(m.retained for m in models),
        "error_mean": max(m.similarity_error["mean"] for m in models),
        "error_max": max(m.similarity_error["max"] for m in models),
        "render_s": render_s,
        **timed,
    }


def time_page(path: str, fragment: str, updates: int, repeats: int) -> dict:
    """The page's own times of `updates` updates, `repeats` times over (each in a fresh browser), their parts, and the
    CPU time per update: a run with updates + 1 minus a run with 1, the median of the repeats."""
    times, parts, cpu, first = [], {k: [] for k in PARTS}, [], []
    for _ in range(repeats):
        _, cpu_one = browser.run_page(path, fragment + "1", "--dump-dom")
        dom, cpu_all = browser.run_page(path, fragment + str(updates + 1), "--dump-dom")
        found = browser.elements_by_id(dom)
        bench = found["bench"]["attrs"]
        times += [float(t) for t in bench["data-times"].split(",")][-updates:]
        for k in PARTS:
            parts[k] += [float(t) for t in bench[f"data-{k}"].split(",")][-updates:]
        cpu.append(1e3 * (cpu_all - cpu_one) / updates)
        first.append(float(found["status"]["attrs"]["data-first-update-ms"]))
    return {
        "load_average": os.getloadavg()[0],
        "first_update_ms": float(np.median(first)),
        "median_update_ms": float(np.median(times)),
        "min_update_ms": min(times),
        "max_update_ms": max(times),
        "cpu_update_ms": float(np.median(cpu)),
        **{f"median_{k}_ms": float(np.median(v)) for k, v in parts.items()},
        "update_times_ms": times,
    }


_SMALL = flags.DEFINE_bool("small", False, "CPU/CI run: tiny arch, 3 small images.")
_DIMS = flags.DEFINE_list("dims", None, "Numbers of kept axes, one row each (default: the plan's).")
_OUT = flags.DEFINE_string("out", None, "JSON path (default bench/results/explore[_small].json).")
_KEEP = flags.DEFINE_string("keep", None, "Write the pages into this folder (default: a temporary one).")


def main(argv: list[str]) -> None:
    program.flags_only(argv)
    spec = dict(SMALL if _SMALL.value else FULL)
    if _DIMS.value:
        spec["dims"] = tuple(int(d) for d in _DIMS.value)
    if browser.find_chromium() is None:
        raise UserError("chromium is not installed; install it with apt-get install -y chromium")
    images = bundled_images(spec["images"])
    names = [f"random {spec['arch']} (seed {seed})" for seed in (0, 1)]
    models = [VisionTransformer(get_arch(spec["arch"]), rngs=nnx.Rngs(seed)) for seed in (0, 1)]
    t0 = time.perf_counter()
    features = data.model_features(images, models, names, size=spec["size"], batch_size=8)
    features_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="bench_explore_") as scratch:
        folder = _KEEP.value or scratch
        os.makedirs(folder, exist_ok=True)
        rows = [page_row(images, features, names, spec, dims, folder) for dims in spec["dims"]]
    load = os.getloadavg()
    print(
        f"\n{len(images)} images at {spec['size']} px, two random-init {spec['arch']}; features of both models "
        f"{features_s:.0f} s; load average {load[0]:.1f} on {os.cpu_count()} CPUs; "
        f"{spec['repeats']} x {spec['updates']} timed updates per row"
    )
    print(common.format_table(rows, COLUMNS))
    result = {
        "bench": "explore",
        "small": _SMALL.value,
        "device": common.device_summary(),
        "spec": spec,
        "features_s": features_s,
        "load_average": load,
        "rows": rows,
    }
    print("wrote", common.write_json(_OUT.value or common.default_out("explore", _SMALL.value), result))


if __name__ == "__main__":
    program.run(main)
