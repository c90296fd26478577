"""Dense NN retrieval speed: exact k-NN queries/s and memory-bank build time per million patches.

    python bench/retrieval.py            # accelerator: 10,240,000 keys x 384 (ViT-S), ViT-S/14 at 504 px
    python bench/retrieval.py --small    # CI / CPU smoke run (tiny sizes)
Writes bench/results/retrieval[_small].json and prints a table, plus an estimate of the full VOC protocol
(21,164 augmented train views, 1,449 val images x 1,296 queries against the memory).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evaluation import knn as knn_lib  # noqa: E402
from evaluation import memory_bank as mb  # noqa: E402
from evaluation.features import FeatureExtractor  # noqa: E402
from evaluation.hummingbird import RetrievalSettings  # noqa: E402
from neco_jax import program  # noqa: E402
from neco_jax.l2_norm import l2_normalize  # noqa: E402
from neco_jax.models import VisionTransformer, get_arch  # noqa: E402

VOC_TRAIN_VIEWS = 2 * 10_582
VOC_VAL_IMAGES = 1_449


class SyntheticSegmentation:
    """In-memory VOC-like images (500 x 375, smooth colours) with rectangle masks over 21 classes."""

    name, split, num_classes, ignore_index = "synthetic", "train", 21, 255

    def __init__(self, n: int, height: int = 375, width: int = 500):
        self.n, self.height, self.width = n, height, width

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        rng = np.random.default_rng(i)
        low = rng.integers(0, 256, (self.height // 25 + 1, self.width // 25 + 1, 3)).astype(np.float32)
        image = np.kron(low, np.ones((25, 25, 1)))[: self.height, : self.width].astype(np.uint8)
        mask = np.zeros((self.height, self.width), np.uint8)
        for c in rng.integers(1, 21, size=3):
            y0, x0 = rng.integers(0, self.height // 2), rng.integers(0, self.width // 2)
            mask[y0 : y0 + self.height // 3, x0 : x0 + self.width // 3] = c
        return image, mask


def random_keys(num_keys: int, dim: int, *, memory_chunk: int, bin_size: int, dtype: str) -> knn_lib.ShardedKeys:
    """Unit-norm random keys generated on the devices (no 15 GB host array), laid out as ``shard_keys`` does."""
    mesh = knn_lib.data_mesh()
    ndev = mesh.devices.size
    chunk, per_device = knn_lib.key_layout(
        num_keys, ndev, memory_chunk=memory_chunk, bin_size=bin_size, k=RetrievalSettings.k
    )

    def make(key):  # the same keys whatever the chunk: draw num_keys rows, then pad
        x = jax.random.normal(key, (num_keys, dim), jnp.float32)
        x = l2_normalize(x).astype(dtype)
        return jnp.pad(x, ((0, ndev * per_device - num_keys), (0, 0)))

    make = jax.jit(make, out_shardings=NamedSharding(mesh, P(knn_lib.AXIS, None)))
    return knn_lib.ShardedKeys(make(jax.random.key(0)), num_keys, chunk, mesh)


def bench_search(store, *, block: int, reps: int, topk_dtype: str, bin_size: int) -> dict:
    queries = jax.random.normal(jax.random.key(1), (block, store.dim), jnp.float32)
    run = lambda: knn_lib.cosine_similarities(  # noqa: E731
        store,
        queries,
        knn_lib.search_block(store, queries, k=RetrievalSettings.k, topk_dtype=topk_dtype, bin_size=bin_size)[1],
    )
    run().block_until_ready()  # compile
    start = time.perf_counter()
    for _ in range(reps):
        out = run()
    out.block_until_ready()
    seconds = (time.perf_counter() - start) / reps
    _, idx = knn_lib.search_block(store, queries, k=RetrievalSettings.k, topk_dtype=topk_dtype, bin_size=bin_size)
    return {"queries_per_s": block / seconds, "seconds_per_block": seconds, "indices": np.asarray(idx)}


def bench_memory_bank(num_images: int, *, arch: str, input_size: int, batch_size: int, memory_size: int) -> dict:
    model = VisionTransformer(get_arch(arch), rngs=nnx.Rngs(0))
    extractor = FeatureExtractor(model, dtype="bfloat16" if jax.default_backend() != "cpu" else "float32")
    data = SyntheticSegmentation(num_images)
    kwargs = dict(
        input_size=input_size,
        patch_size=extractor.patch_size,
        memory_size=memory_size,
        batch_size=batch_size,
        jitter=RetrievalSettings.jitter,
    )
    mb.build_memory_bank(data.__class__(batch_size), extractor, passes=1, **kwargs)  # compile
    start = time.perf_counter()
    bank = mb.build_memory_bank(data, extractor, passes=RetrievalSettings.passes, **kwargs)
    seconds = time.perf_counter() - start
    views = RetrievalSettings.passes * num_images
    return {
        "views": views,
        "seconds": seconds,
        "views_per_s": views / seconds,
        "kept_patches": len(bank),
        "seconds_per_million_kept_patches": seconds / len(bank) * 1e6,
        "seconds_per_million_processed_patches": seconds / (views * (input_size // extractor.patch_size) ** 2) * 1e6,
    }


_SMALL = flags.DEFINE_bool("small", False, "Tiny sizes for CI / CPU.")


def main(argv: list[str]) -> None:
    program.flags_only(argv)
    if _SMALL.value:
        sizes = dict(keys=50_000, dim=64, block=1024, reps=2, images=8, arch="vit_tiny_test", input=112)
        configs = [("float32", "float32", 0, 8192), ("bfloat16", "float32", 0, 8192), ("bfloat16", "float32", 32, 8192)]
    else:
        sizes = dict(
            keys=10_240_000, dim=384, block=16 * 1296, reps=3, images=256, arch="vit_small_patch14_dinov2", input=504
        )
        configs = [  # (key dtype, ranking dtype, bin size, keys per chunk)
            ("bfloat16", "float32", 0, 65536),
            ("bfloat16", "bfloat16", 0, 65536),
            ("bfloat16", "float32", 32, 65536),
            ("bfloat16", "float32", 128, 65536),
            ("bfloat16", "bfloat16", 128, 65536),
            ("bfloat16", "float32", 128, 262144),
            ("bfloat16", "float32", 512, 262144),
        ]
    device = f"{jax.devices()[0].device_kind} x{jax.device_count()}"
    rows, plain = [], {}
    for dtype, topk_dtype, bin_size, chunk in configs:
        store = random_keys(sizes["keys"], sizes["dim"], memory_chunk=chunk, bin_size=bin_size, dtype=dtype)
        res = bench_search(store, block=sizes["block"], reps=sizes["reps"], topk_dtype=topk_dtype, bin_size=bin_size)
        idx = res.pop("indices")
        if bin_size == 0:  # chunking does not change the answer, so any plain run is the reference
            plain[(dtype, topk_dtype)] = idx
        same = bool((idx == plain[(dtype, topk_dtype)]).all()) if (dtype, topk_dtype) in plain else None
        voc_queries = VOC_VAL_IMAGES * 1296
        rows.append(
            {
                "dtype": dtype,
                "topk_dtype": topk_dtype,
                "bin_size": bin_size,
                "chunk": store.chunk,
                "keys": sizes["keys"],
                "dim": sizes["dim"],
                "block": sizes["block"],
                **res,
                "same_as_plain_topk": same,
                "voc_val_search_s_at_this_memory": voc_queries / res["queries_per_s"],
            }
        )
        del store
    bank = bench_memory_bank(
        sizes["images"],
        arch=sizes["arch"],
        input_size=sizes["input"],
        batch_size=16,
        memory_size=sizes["images"] * 2 * 483,
    )
    best = max(rows, key=lambda r: r["queries_per_s"])
    estimate = {
        "memory_build_s": VOC_TRAIN_VIEWS / bank["views_per_s"],
        "val_search_s": best["voc_val_search_s_at_this_memory"],
    }
    estimate["total_s"] = estimate["memory_build_s"] + estimate["val_search_s"]
    result = {
        "device": device,
        "host": platform.node(),
        "small": _SMALL.value,
        "search": rows,
        "memory_bank": bank,
        "voc_full_estimate": estimate,
    }
    print(f"device: {device}")
    print(f"{'dtype':>9} {'topk':>9} {'bins':>5} {'chunk':>7} {'keys':>10} {'queries/s':>12} {'exact=plain':>11}")
    for r in rows:
        print(
            f"{r['dtype']:>9} {r['topk_dtype']:>9} {r['bin_size']:>5} {r['chunk']:>7} {r['keys']:>10} "
            f"{r['queries_per_s']:>12.0f} {str(r['same_as_plain_topk']):>11}"
        )
    print(
        f"memory bank: {bank['views_per_s']:.1f} views/s, {bank['seconds_per_million_kept_patches']:.1f} s per "
        f"million kept patches ({bank['seconds_per_million_processed_patches']:.1f} s per million processed)"
    )
    print(
        f"full VOC estimate: build {estimate['memory_build_s']:.0f} s + search {estimate['val_search_s']:.0f} s "
        f"= {estimate['total_s']:.0f} s"
    )
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "retrieval_small.json" if _SMALL.value else "retrieval.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    program.run(main)
