"""Input-pipeline throughput: images/s and crops/s per worker count, for the 224/98 and 518/98 recipes, on the
bundled photos and on larger synthetic JPEGs, plus a single-core stage profile used to extrapolate to big hosts,
and the host CPU time per image of `make_views` with data.augment_on="device" (uint8 crops + drawn colour
parameters) beside "host" (the PIL colour ops and normalisation in the workers), measured in one run.

    python bench/input_pipeline.py            # full (several minutes on 2 cores)
    python bench/input_pipeline.py --small    # CI smoke run
Writes bench/results/input_pipeline[_small].json and prints a table.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
from absl import flags
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from input_pipeline.decode import decode_rgb  # noqa: E402
from input_pipeline.loader import make_train_loader  # noqa: E402
from input_pipeline.sample_data import sample_source  # noqa: E402
from input_pipeline.settings import LoaderSettings  # noqa: E402
from input_pipeline.sources import folder_source  # noqa: E402
from input_pipeline.views import (  # noqa: E402
    ViewSettings,
    color_augment,
    crop_pair_boxes,
    make_views,
    normalize,
    resized_crop,
    sample_crop_boxes,
)
from neco_jax import program  # noqa: E402

RECIPES = {"224/98": (224, 98), "518/98": (518, 98)}
TARGET_IMAGES_PER_S = 400  # about one H100 at the recipe's batch 64 (0.17 s per step)


def synthetic_jpegs(folder: str, n: int, width: int, height: int) -> str:
    """Smooth random-colour photos-like JPEGs (quality 90), so decode cost resembles real photos."""
    rng = np.random.default_rng(0)
    for i in range(n):
        low = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((width, height), Image.BICUBIC)
        noise = rng.normal(0, 8, (height, width, 3))
        arr = np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(os.path.join(folder, f"synth_{i:04d}.jpg"), quality=90)
    return folder


STAGES = ("read", "decode", "geometry", "resize", "colour", "normalize")


def stage_profile(source, cfg: ViewSettings, reps: int) -> dict:
    """Single-thread CPU seconds per image for each stage: the per-core cost, robust to a busy machine
    (wall-clock on a shared host overstates it; the wall total is kept for comparison)."""
    totals = dict.fromkeys(STAGES, 0.0)
    rng = np.random.default_rng(0)
    count = 0
    wall = time.perf_counter()
    for _ in range(reps):
        for i in range(len(source)):
            marks = [time.process_time()]
            data = source[i]
            marks.append(time.process_time())
            img = decode_rgb(data)
            marks.append(time.process_time())
            boxes = sample_crop_boxes(rng, img.width, img.height, cfg)
            crop_pair_boxes(boxes, cfg)
            marks.append(time.process_time())
            crops = [resized_crop(img, b, cfg.size_crops[cfg.crop_group(k)]) for k, b in enumerate(boxes)]
            marks.append(time.process_time())
            crops = [color_augment(c, rng, cfg) for c in crops]
            marks.append(time.process_time())
            [normalize(c) for c in crops]
            marks.append(time.process_time())
            for k, a, b in zip(STAGES, marks, marks[1:]):
                totals[k] += b - a
            count += 1
    per_image = {k: v / count for k, v in totals.items()}
    per_image["total"] = sum(per_image.values())
    per_image["host_only_total"] = per_image["total"] - per_image["colour"] - per_image["normalize"]
    per_image["wall_total"] = (time.perf_counter() - wall) / count
    return per_image


def mode_profile(source, cfg: ViewSettings, reps: int) -> dict:
    """Single-thread CPU seconds per image: decode, and `make_views` in each augment_on mode on the same
    decoded image with the same generator seed (the same crops and draws), interleaved so that machine load
    falls on both alike."""
    decode_s, views_s, count = 0.0, {"device": 0.0, "host": 0.0}, 0
    cfgs = {mode: dataclasses.replace(cfg, augment_on=mode) for mode in views_s}
    for _ in range(reps):
        for i in range(len(source)):
            data = source[i]
            t0 = time.process_time()
            img = decode_rgb(data)
            decode_s += time.process_time() - t0
            for mode, mode_cfg in cfgs.items():
                t0 = time.process_time()
                make_views(img, np.random.default_rng([count]), mode_cfg)
                views_s[mode] += time.process_time() - t0
            count += 1
    out = {"decode_s": decode_s / count, "images": count}
    for mode, total in views_s.items():
        per_image = total / count
        with_decode = per_image + out["decode_s"]
        out[mode] = {
            "views_s": per_image,
            "images_per_s_per_core": 1 / with_decode,
            "cores_for_target": TARGET_IMAGES_PER_S * with_decode,
        }
    out["host_over_device"] = out["host"]["views_s"] / out["device"]["views_s"]
    return out


def loader_rate(source, recipe, workers: int, threads: int, batch_size: int, batches: int, mode: str) -> dict:
    loader = make_train_loader(
        ViewSettings(size_crops=tuple(recipe), augment_on=mode),
        LoaderSettings(num_workers=workers, threads_per_worker=threads, max_bad_fraction=1.0),
        batch_size=batch_size,
        seed=0,
        process=(0, 1),
        source=source,
    )
    t0 = time.perf_counter()
    next(loader)  # start-up (worker spawn, first batch) is reported apart from the steady rate
    t1 = time.perf_counter()
    for _ in range(batches):
        next(loader)
    t2 = time.perf_counter()
    loader.close()
    images = batches * batch_size
    return {"startup_s": t1 - t0, "images_per_s": images / (t2 - t1), "crops_per_s": 6 * images / (t2 - t1)}


_SMALL = flags.DEFINE_bool("small", False, "Quick CI run: few images and batches.")
_WORKERS = flags.DEFINE_list("workers", None, "Comma-separated worker counts (default 0,1,2; --small: 0).")
_THREADS = flags.DEFINE_integer("threads", 1, "Reader threads per worker.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Images per batch (default 8; --small: 4).")
_BATCHES = flags.DEFINE_integer("batches", None, "Timed batches per configuration (default 6; --small: 2).")
_OUT = flags.DEFINE_string("out", None, "JSON path (default bench/results/input_pipeline[_small].json).")


def main(argv: list[str]) -> None:
    program.flags_only(argv)

    small = _SMALL.value
    workers = [int(w) for w in (_WORKERS.value or (["0"] if small else ["0", "1", "2"]))]
    batch_size = _BATCH_SIZE.value or (4 if small else 8)
    batches = _BATCHES.value or (2 if small else 6)
    synth_size = (640, 480) if small else (1600, 1200)
    here = os.path.dirname(os.path.abspath(__file__))
    out = _OUT.value or os.path.join(here, "results", "input_pipeline_small.json" if small else "input_pipeline.json")

    with tempfile.TemporaryDirectory() as tmp:
        sources = {
            "sample photos": sample_source(notice=False),
            f"synthetic JPEG {synth_size[0]}x{synth_size[1]}": folder_source(
                synthetic_jpegs(tmp, 8 if small else 16, *synth_size)
            ),
        }
        results = {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "settings": {
                "batch_size": batch_size,
                "batches": batches,
                "threads_per_worker": _THREADS.value,
                "small": small,
            },
            "stages": {},
            "loader": [],
        }
        results["modes"] = {}
        for sname, source in sources.items():  # profile first: no loader threads running yet
            for rname, recipe in RECIPES.items():
                results["stages"][f"{sname} | {rname}"] = stage_profile(source, ViewSettings(size_crops=recipe), 1)
                results["modes"][f"{sname} | {rname}"] = mode_profile(
                    source, ViewSettings(size_crops=recipe), 1 if small else 2
                )
        for sname, source in sources.items():
            for rname, recipe in RECIPES.items():
                for w in workers:
                    for mode in ("device", "host"):
                        rate = loader_rate(source, recipe, w, _THREADS.value, batch_size, batches, mode)
                        results["loader"].append(
                            {"source": sname, "recipe": rname, "workers": w, "augment_on": mode, **rate}
                        )
                        print(
                            f"  {sname:28s} {rname:7s} workers={w} {mode:6s}: {rate['images_per_s']:7.1f} img/s",
                            flush=True,
                        )

    print(
        "\nSingle-core CPU ms per image: " + ", ".join(STAGES) + " | total -> img/s/core, x16 cores; "
        "without colour+normalize (moved on device) -> x16 cores"
    )
    for key, p in results["stages"].items():
        parts = " ".join(f"{1e3 * p[k]:6.1f}" for k in STAGES)
        print(
            f"  {key:44s} {parts} | {1e3 * p['total']:6.1f} -> {1 / p['total']:5.1f}, {16 / p['total']:6.0f}"
            f" | {1e3 * p['host_only_total']:6.1f} -> {16 / p['host_only_total']:6.0f}"
        )
    print(
        f"\nHost CPU ms per image, one core: make_views with augment_on=host vs device (decode excluded), "
        f"then with decode: images/s per core and cores for {TARGET_IMAGES_PER_S} images/s"
    )
    print(
        f"  {'source | recipe':44s} {'decode':>7s} {'host':>7s} {'device':>7s} {'ratio':>6s} | "
        f"{'host img/s/core':>15s} {'cores':>6s} | {'device img/s/core':>17s} {'cores':>6s}"
    )
    for key, m in results["modes"].items():
        h, d = m["host"], m["device"]
        print(
            f"  {key:44s} {1e3 * m['decode_s']:7.1f} {1e3 * h['views_s']:7.1f} {1e3 * d['views_s']:7.1f} "
            f"{m['host_over_device']:5.1f}x | {h['images_per_s_per_core']:15.1f} {h['cores_for_target']:6.1f} | "
            f"{d['images_per_s_per_core']:17.1f} {d['cores_for_target']:6.1f}"
        )
    print(f"\nLoader throughput ({os.cpu_count()} CPUs here, batch {batch_size}, {_THREADS.value} thread(s)/worker):")
    print(
        f"  {'source':28s} {'recipe':7s} {'workers':>7s} {'mode':>6s} {'img/s':>8s} {'crops/s':>8s} {'startup s':>9s}"
    )
    for r in results["loader"]:
        print(
            f"  {r['source']:28s} {r['recipe']:7s} {r['workers']:7d} {r['augment_on']:>6s} "
            f"{r['images_per_s']:8.1f} {r['crops_per_s']:8.1f} {r['startup_s']:9.1f}"
        )
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    program.run(main)
