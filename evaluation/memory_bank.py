"""The Hummingbird memory bank: augmented train patches as L2-normalised keys with soft class labels.

Follows open-hummingbird-eval 2.0 (vpariza/open-hummingbird-eval `hbird/hbird_eval.py` and
`hbird/utils/transforms.py`; docs/evaluation.md):
- each pass over the train set (2 passes by default) draws, per image, colour jitter on the
  full-resolution image (brightness, contrast, saturation, hue, range 0.1 each, each applied with
  p=0.5, in that order), then a paired random resized crop (scale (0.5, 2.0), ratio (3/4, 4/3),
  torchvision's 10 tries and centre-crop fallback) resized to the input size, bilinear with
  antialias for the image and nearest for the mask;
- a patch's label is its per-class pixel count (255 counted as class 0, as the reference does),
  stored as integers and divided by the patch area when neighbours are gathered;
- with a bounded ``memory_size`` each image keeps ``memory_size // (num_images * passes)`` patches,
  the ones with the smallest ``U(0,1) * sum of the image-level frequencies of the classes in the
  patch`` (rare classes first); when that number is not below the patches per image (small
  fractions), the rule cannot pick anything useful and the memory keeps every patch (unbounded).

Normalisation: the reference uses std (0.229, 0.224, 0.255), a typo for 0.225. We use 0.225; the
config field ``reproduce_std_typo`` switches the typo back on for comparisons with published numbers.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageEnhance

from evaluation.features import FeaturesFn, iterate_batches, nearest_indices
from input_pipeline.views import CROP_RATIO, IMAGENET_STD, adjust_hue, random_resized_crop_params
from neco_jax.errors import ConfigError, DatasetError
from neco_jax.l2_norm import l2_normalize

HBIRD_TYPO_STD = np.array([0.229, 0.224, 0.255], dtype=np.float32)
CROP_SCALE = (0.5, 2.0)  # area fraction; above 1 cannot fit, so torchvision's fallback crop takes over
FRACTIONS = (1, 8, 64, 128)  # 1/n of the train set; n > 1 reads a released list file


def restandardise(images: np.ndarray, reproduce_std_typo: bool) -> np.ndarray:
    """Images normalised with std 0.225 turned into the reference's typo normalisation (std 0.255) if asked.

    Exact up to rounding: (v - m) / s' = ((v - m) / s) * s / s'.
    """
    return images * (IMAGENET_STD / HBIRD_TYPO_STD) if reproduce_std_typo else images


# ----------------------------------------------------------------------------- data fractions


def fraction_list_path(file_sets_dir: str | Path, dataset: str, fraction: int, seed: int) -> Path:
    """Released list file for 1/``fraction`` of the train set, in open-hummingbird-eval's ``file_sets`` layout."""
    split = {"voc": "trainaug", "ade20k": "training"}.get(dataset)
    if split is None:
        raise ConfigError(f"data fractions exist for voc and ade20k only, not {dataset!r}; set fraction=1")
    return Path(file_sets_dir) / dataset / f"1_div_{fraction}" / f"{split}_{fraction}_{seed}.txt"


def read_fraction_list(path: Path) -> list[str]:
    """Image names (no extension) of a fraction list file."""
    if not path.is_file():
        raise DatasetError(
            f"fraction list {path} does not exist; copy file_sets/ from open-hummingbird-eval and point "
            "--config.file_sets_dir at it"
        )
    return [Path(line.strip()).stem for line in path.read_text().splitlines() if line.strip()]


def subset_by_names(dataset, names: list[str]):
    """``dataset`` restricted to the images named in ``names`` (list order); unknown names are an error."""
    position = {Path(p).stem: i for i, p in enumerate(dataset.image_paths)}
    missing = [n for n in names if n not in position]
    if missing:
        raise DatasetError(
            f"{len(missing)} images of the fraction list are not in the {dataset.name} {dataset.split} split "
            f"(first: {missing[0]}); check --config.data_dir and the list file"
        )
    return dataset.subset([position[n] for n in names])


# ----------------------------------------------------------------------------- augmentation


def color_jitter(image: np.ndarray, rng: np.random.Generator, strength: float, p: float = 0.5) -> np.ndarray:
    """Brightness, contrast, saturation, hue jitter (each with probability ``p``, fixed order) on uint8 RGB.

    Uses the PIL operations torchvision's ``ColorJitter`` calls on PIL images, so the pixels match it.
    """
    if strength == 0:
        return image
    pil = Image.fromarray(image)
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    for enhancer in enhancers:
        if rng.random() < p:
            pil = enhancer(pil).enhance(rng.uniform(1 - strength, 1 + strength))
    if rng.random() < p:
        pil = adjust_hue(pil, rng.uniform(-strength, strength))
    return np.asarray(pil)


@functools.lru_cache(maxsize=4096)  # crop sizes repeat across a pass; callers never modify the result
def resize_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) matrix of bilinear antialiased resampling weights, rows summing to 1.

    The triangle filter widened by the downscale factor, clipped to the input and renormalised:
    the weights of torch's ``interpolate(mode="bilinear", antialias=True, align_corners=False)``
    (and PIL's bilinear resize).
    """
    f32 = np.float32  # float32 throughout, as torch computes these weights; float64 differs by ~2e-5
    scale = f32(in_size) / f32(out_size)
    support = max(scale, f32(1.0))
    centres = scale * (np.arange(out_size, dtype=f32) + f32(0.5))
    lo = np.maximum((centres - support + f32(0.5)).astype(np.int64), 0)
    hi = np.minimum((centres + support + f32(0.5)).astype(np.int64), in_size)
    cols = np.arange(in_size)
    distance = np.abs((cols[None, :].astype(f32) - centres[:, None] + f32(0.5)) / support)
    weights = np.maximum(f32(0.0), f32(1.0) - distance)
    weights = weights * ((cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None]))
    return weights / weights.sum(axis=1, keepdims=True)


def train_view(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, *, size: int, jitter: float
) -> tuple[np.ndarray, np.ndarray]:
    """One augmented pair: image (size, size, 3) float32 on the 0..255 scale and mask (size, size) uint8.

    The reference resizes the already normalised image; resampling is linear with unit-sum weights,
    so resizing first and normalising afterwards (``input_pipeline.views.normalize``) gives the same values.
    """
    jittered = color_jitter(image, rng, jitter)  # whole image: contrast uses its mean grey level
    top, left, h, w = random_resized_crop_params(rng, image.shape[1], image.shape[0], CROP_SCALE, CROP_RATIO)
    crop = jittered[top : top + h, left : left + w].astype(np.float32)
    rows = (resize_weights(h, size) @ crop.reshape(h, w * 3)).reshape(size, w, 3)  # resample rows
    cols = resize_weights(w, size) @ rows.transpose(1, 0, 2).reshape(w, size * 3)  # then columns, one matmul
    view = cols.reshape(size, size, 3).transpose(1, 0, 2)
    mask_rows = top + nearest_indices(h, size)
    mask_cols = left + nearest_indices(w, size)
    return np.ascontiguousarray(view), mask[mask_rows[:, None], mask_cols[None, :]]


# ----------------------------------------------------------------------------- patch labels and selection


def patch_label_counts(masks: np.ndarray, patch_size: int, num_classes: int) -> np.ndarray:
    """Per-patch class pixel counts (B, S*S, C) of masks (B, H, W); 255 counts as class 0 (as the reference)."""
    masks = np.where(masks == 255, 0, masks).astype(np.int64)
    if masks.max(initial=0) >= num_classes:
        raise DatasetError(f"a mask holds label {masks.max()} but the dataset has {num_classes} classes")
    b, h, w = masks.shape
    s_h, s_w = h // patch_size, w // patch_size
    patches = masks.reshape(b, s_h, patch_size, s_w, patch_size).transpose(0, 1, 3, 2, 4).reshape(b, s_h * s_w, -1)
    flat = patches + num_classes * np.arange(b * s_h * s_w).reshape(b, s_h * s_w, 1)
    counts = np.bincount(flat.ravel(), minlength=b * s_h * s_w * num_classes)
    dtype = np.uint8 if patch_size * patch_size <= 255 else np.uint16
    return counts.reshape(b, s_h * s_w, num_classes).astype(dtype)


def patches_per_image(memory_size: int | None, num_images: int, passes: int, patches: int) -> int | None:
    """Patches each image keeps, or None for the unbounded memory (all patches).

    The bounded rule ``memory_size // (num_images * passes)`` needs fewer than ``patches`` per image;
    at or above that (small fractions) every patch is kept, since the reference's top-k would fail.
    """
    if memory_size is None:
        return None
    n = memory_size // (num_images * passes)
    if n < 1:
        raise ConfigError(
            f"memory_size {memory_size} is smaller than {num_images} images x {passes} passes; raise memory_size"
        )
    return None if n >= patches else n


def select_patches(counts: np.ndarray, n: int, uniform: np.ndarray) -> np.ndarray:
    """Indices of the ``n`` patches of one image (counts (N, C)) with the smallest rare-class score.

    score = U(0,1) * sum over the classes present in the patch of the number of patches holding
    that class; empty patches score 1e6. Ties go to the lower index (a stable sort).
    """
    present = counts > 0
    class_frequency = present.sum(axis=0)
    scores = (present * class_frequency[None, :]).sum(axis=1).astype(np.float64)
    nonempty = present.any(axis=1)
    scores = np.where(nonempty, scores * uniform, 1e6)
    return np.argsort(scores, kind="stable")[:n]


# ----------------------------------------------------------------------------- building the bank


@dataclasses.dataclass
class MemoryBank:
    """Keys (M, D) float32 L2-normalised, integer label counts (M, C) and the patch area they divide by."""

    keys: np.ndarray
    label_counts: np.ndarray
    patch_area: int

    def __len__(self) -> int:
        return int(self.keys.shape[0])


def build_memory_bank(
    dataset,
    features_fn: FeaturesFn,
    *,
    input_size: int,
    patch_size: int,
    passes: int,
    memory_size: int | None,
    jitter: float,
    batch_size: int = 16,
    reproduce_std_typo: bool = False,
    seed: int = 0,
    num_threads: int = 8,
) -> MemoryBank:
    """Runs ``passes`` augmented passes over ``dataset`` and keeps the selected patches.

    ``dataset[i]`` gives (RGB uint8, labels uint8); ``features_fn`` maps normalised images
    (B, input_size, input_size, 3) to patch tokens (B, h, w, D). ``passes``, ``memory_size`` (None: every
    patch) and ``jitter`` (the colour-jitter range; 0 switches it off, e.g. for features that read colours) have
    the protocol's values in ``evaluation.hummingbird.RetrievalSettings``. Each image's randomness comes
    from its own generator seeded by (seed, pass, index), so threads do not change the result.
    """
    if input_size % patch_size:
        raise ConfigError(f"input_size {input_size} is not a multiple of the patch size {patch_size}")
    grid = input_size // patch_size
    per_image = patches_per_image(memory_size, len(dataset), passes, grid * grid)
    total = passes * len(dataset) * (grid * grid if per_image is None else per_image)
    keys = labels = None
    filled = 0
    for p in range(passes):

        def load(ds, i, p=p):
            rng = np.random.default_rng([seed, p, i])
            return train_view(*ds[i], rng, size=input_size, jitter=jitter)

        batches = iterate_batches(
            dataset,
            batch_size=batch_size,
            image_size=input_size,
            mask_size=input_size,
            load_fn=load,
            num_threads=num_threads,
            desc=f"memory bank pass {p + 1}/{passes}",
        )
        for batch in batches:
            images = restandardise(batch.images, reproduce_std_typo)
            feats = l2_normalize(jnp.asarray(features_fn(images), jnp.float32))  # per patch (v2.0; v1 used dim=1)
            feats = np.asarray(feats).reshape(feats.shape[0], -1, feats.shape[-1])
            counts = patch_label_counts(batch.masks, patch_size, dataset.num_classes)
            if keys is None:  # preallocated: 10,240,000 keys must not be copied by a final concatenate
                keys = np.empty((total, feats.shape[-1]), np.float32)
                labels = np.empty((total, counts.shape[-1]), counts.dtype)
            for f, c, i in zip(feats, counts, batch.indices):
                if per_image is not None:
                    uniform = np.random.default_rng([seed, p, int(i), 1]).random(c.shape[0])
                    keep = select_patches(c, per_image, uniform)
                    f, c = f[keep], c[keep]
                keys[filled : filled + len(f)] = f
                labels[filled : filled + len(c)] = c
                filled += len(f)
    return MemoryBank(keys, labels, patch_size * patch_size)
