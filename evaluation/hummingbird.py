"""Dense nearest-neighbour retrieval ("Hummingbird", in-context scene understanding), as open-hummingbird-eval.

A memory bank of augmented train patches (``memory_bank``) is searched exactly (``knn``) for the
30 nearest keys of every val patch; their soft labels are combined by a softmax over cosines at
temperature 0.02 and upsampled bilinearly to the input size (``label_transfer``), and the
argmax is scored with Hungarian-matched mIoU over the dataset (``metrics``).

Val images: ``Resize((S, S))`` with antialias for the image (PIL bilinear) and torch-style nearest
for the mask (the reference turns the mask into a tensor before resizing it).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from evaluation import knn as knn_lib
from evaluation import memory_bank as mb
from evaluation.datasets import VOC_CLASSES
from evaluation.features import FeaturesFn, iterate_batches, nearest_resize, resize_image
from evaluation.job_inputs import make_extractor, open_split
from evaluation.label_transfer import predict_segmentation
from evaluation.metrics import confusion_matrix, miou_from_confusion
from evaluation.settings import from_config, top_level
from evaluation.visualize import save_segmentation_panels
from neco_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class RetrievalSettings:
    """The protocol's knobs; the defaults are open-hummingbird-eval 2.0's (``vpariza/open-hummingbird-eval``)
    with the paper's memory of 10,240,000 patches (Balazevic et al., "Towards In-context Scene Understanding",
    NeurIPS 2023).

    The job configs' ``config.hummingbird`` is built from these defaults, except the fields of ``TOP_LEVEL``,
    which the configs keep at their top level (see ``evaluation.settings``).
    """

    # Square input size (504 = 36 x 14; use 512 for /16 backbones); predictions and masks are compared at it.
    input_size: int = 504
    # Neighbours per query and the softmax temperature of the label transfer.
    k: int = 30
    temperature: float = 0.02
    # Augmented passes over the train images (the reference's augmentation_epoch).
    passes: int = 2
    # Memory patches in total (each image keeps memory_size // (images * passes)); 0 = every patch. When the
    # per-image share reaches the patches per image (small fractions), every patch is kept.
    memory_size: int = 10_240_000
    # Images per feature-extraction batch.
    batch_size: int = 16
    # The reference normalises with std (0.229, 0.224, 0.255), a typo for 0.225. Off: 0.225 (ImageNet's value).
    # On: the typo, to compare with published numbers.
    reproduce_std_typo: bool = False
    # Colour-jitter range of brightness, contrast, saturation and hue on memory images (0 = none).
    jitter: float = 0.1
    # Search precision: keys/queries stored and multiplied in search_dtype, scores ranked in topk_dtype
    # ("float32" or "bfloat16"); neighbour weights always use fp32 cosines.
    search_dtype: str = "bfloat16"
    topk_dtype: str = "float32"
    # Keys scored per step on each device (bounds device memory), and the bin-max prefilter, which is exact
    # (b > 0 ranks bins of b keys by their best score and selects only inside the best k bins; 0 = plain top-k
    # over every score; see evaluation/knn.py and bench/retrieval.py for the speed of each).
    memory_chunk: int = 65536
    bin_size: int = 128
    # Seed of the augmentation and of the patch selection.
    seed: int = 0
    # Image decoding threads, and how many (image, ground truth, prediction) examples are returned for pictures.
    num_threads: int = 8
    num_visualize: int = 0


# Settings fields the job configs keep at their top level, shared with the other protocols (field -> config key).
TOP_LEVEL = {
    "input_size": "image_size",
    "batch_size": "batch_size",
    "num_threads": "num_threads",
    "num_visualize": "num_visualize",
}


@functools.partial(jax.jit, static_argnames=("grid", "size", "temperature", "patch_area"))
def _segment(cosines, indices, label_counts, *, grid, size, temperature, patch_area):
    labels = jnp.take(label_counts, indices, axis=0).astype(jnp.float32) / patch_area
    return predict_segmentation(cosines, labels, grid=grid, size=size, temperature=temperature)


def _load_val(dataset, i: int, size: int):
    image, mask = dataset[i]
    return resize_image(image, size), nearest_resize(mask, size)


def evaluate_retrieval(
    train_dataset,
    val_dataset,
    features_fn: FeaturesFn,
    *,
    patch_size: int,
    settings: RetrievalSettings = RetrievalSettings(),
) -> dict:
    """Builds the memory from ``train_dataset``, labels ``val_dataset`` by retrieval, returns results.

    ``features_fn`` maps ImageNet-normalised images (B, S, S, 3) to patch tokens (B, S/p, S/p, D).
    Returns ``{"miou", "per_class_iou", "memory_patches", "memory_build_s", "examples"}``, where
    ``examples`` holds up to ``num_visualize`` (image uint8, ground truth, prediction) triples.
    """
    s = settings
    start = time.perf_counter()
    bank = mb.build_memory_bank(
        train_dataset,
        features_fn,
        input_size=s.input_size,
        patch_size=patch_size,
        passes=s.passes,
        memory_size=s.memory_size or None,
        batch_size=s.batch_size,
        reproduce_std_typo=s.reproduce_std_typo,
        jitter=s.jitter,
        seed=s.seed,
        num_threads=s.num_threads,
    )
    store = knn_lib.shard_keys(bank.keys, memory_chunk=s.memory_chunk, dtype=s.search_dtype, bin_size=s.bin_size, k=s.k)
    label_counts = jax.device_put(bank.label_counts, NamedSharding(store.mesh, PartitionSpec()))
    build_seconds = time.perf_counter() - start
    num_classes, ignore = val_dataset.num_classes, val_dataset.ignore_index
    conf = np.zeros((num_classes, num_classes), np.int64)
    grid = s.input_size // patch_size
    block = s.batch_size * grid * grid  # queries are padded to one shape so the search compiles once
    examples = []
    batches = iterate_batches(
        val_dataset,
        batch_size=s.batch_size,
        image_size=s.input_size,
        mask_size=s.input_size,
        load_fn=functools.partial(_load_val, size=s.input_size),
        num_threads=s.num_threads,
        desc="retrieval",
    )
    for batch in batches:
        images = mb.restandardise(batch.images, s.reproduce_std_typo)
        feats = np.asarray(features_fn(images), dtype=np.float32)
        queries = feats.reshape(-1, feats.shape[-1])
        n = queries.shape[0]
        queries = jnp.asarray(np.concatenate([queries, np.zeros((block - n, queries.shape[1]), np.float32)]))
        _, indices = knn_lib.search_block(store, queries, k=s.k, topk_dtype=s.topk_dtype, bin_size=s.bin_size)
        cosines = knn_lib.cosine_similarities(store, queries, indices)
        pred = _segment(
            cosines[:n],
            indices[:n],
            label_counts,
            grid=(grid, grid),
            size=(s.input_size, s.input_size),
            temperature=s.temperature,
            patch_area=bank.patch_area,
        )
        pred = np.asarray(pred)
        conf += confusion_matrix(pred, batch.masks, num_classes=num_classes, ignore_index=ignore)
        for j in range(min(len(pred), s.num_visualize - len(examples))):
            image = resize_image(val_dataset.image(int(batch.indices[j])), s.input_size)
            examples.append((image, batch.masks[j], pred[j]))
    score, per_class = miou_from_confusion(conf, "hungarian")
    return {
        "miou": score,
        "per_class_iou": per_class.tolist(),
        "memory_patches": len(bank),
        "memory_build_s": round(build_seconds, 1),
        "examples": examples,
    }


def settings_from_config(config: ml_collections.ConfigDict) -> RetrievalSettings:
    return from_config(RetrievalSettings, config.hummingbird, **top_level(config, TOP_LEVEL))


def train_split_for(config: ml_collections.ConfigDict):
    """The memory's train images: the whole train split, or the released 1/n list of ``config.hummingbird``."""
    h = config.hummingbird
    if h.fraction not in mb.FRACTIONS:
        raise ConfigError(f"config.hummingbird.fraction={h.fraction}; use one of {mb.FRACTIONS} (1/n of the train set)")
    train = open_split(config, config.train_split)
    if h.fraction == 1:
        return train
    file_sets = h.file_sets_dir or str(Path(config.data_dir) / "file_sets")
    names = mb.read_fraction_list(mb.fraction_list_path(file_sets, config.dataset, h.fraction, h.fraction_seed))
    return mb.subset_by_names(train, names)


def run(config: ml_collections.ConfigDict, model=None) -> dict:
    """The protocol entry of ``python -m evaluation`` (see configs/eval/voc_hummingbird.py)."""
    extractor = make_extractor(config, model)
    train = train_split_for(config)
    val = open_split(config, config.val_split)
    settings = settings_from_config(config)
    results = evaluate_retrieval(train, val, extractor, patch_size=extractor.patch_size, settings=settings)
    examples = results.pop("examples")
    if examples:  # image | ground truth | retrieval prediction
        save_segmentation_panels(examples, Path(config.workdir) / "retrieval", num_classes=val.num_classes)
    h = config.hummingbird
    std = "0.255 (reference typo)" if h.reproduce_std_typo else "0.225"
    results.update(fraction=f"1/{h.fraction}", nn_backend="exact k-NN (JAX)", std=std)
    if config.dataset == "voc":
        results["class_names"] = list(VOC_CLASSES)
    return results
