"""A tiny Pascal-VOC-layout dataset for evaluation tests, and feature extractors whose answer is known.

Every class c has its own base colour (`CLASS_COLORS[c]`, points of a 3x3x3 grid 107 levels apart) plus a
bounded texture (stripes and noise, at most +-22 per channel), so the class of any pixel can be read back from
its colour. `oracle_features` does exactly that per patch (class fractions + small noise): separable features,
so linear probing and clustering should score close to 100% mIoU. `noise_features` ignores the image: chance.

Masks carry VOC's 255 "void" band around each shape; every one of the 21 classes appears in every split.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
from PIL import Image

from input_pipeline.views import IMAGENET_MEAN, IMAGENET_STD

NUM_CLASSES = 21
CLASS_COLORS = np.array(list(itertools.product((20, 127, 234), repeat=3))[:NUM_CLASSES], dtype=np.uint8)
_SIZES = ((112, 112), (96, 128), (128, 100), (120, 120))  # (H, W); varied so that resizing is exercised


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    angle, period = rng.uniform(0, np.pi), rng.uniform(4, 12)
    stripes = 10 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    return stripes[..., None] + rng.uniform(-12, 12, size=(h, w, 3))


def make_example(rng: np.random.Generator, size: tuple[int, int], classes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """One image (uint8 RGB) and its mask: class-0 background and one large rectangle or ellipse per class."""
    h, w = size
    labels = np.zeros((h, w), dtype=np.int64)
    yy, xx = np.mgrid[0:h, 0:w]
    void = np.zeros((h, w), dtype=bool)
    for n, c in enumerate(classes):
        # Each shape gets its own horizontal band so that shapes rarely hide each other completely.
        y0 = int(n * h / len(classes))
        y1 = int((n + 1) * h / len(classes))
        x0 = int(rng.integers(0, w // 3))
        x1 = int(rng.integers(2 * w // 3, w))
        if rng.random() < 0.5:
            inside = (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)
        else:
            cy, cx, ry, rx = (y0 + y1) / 2, (x0 + x1) / 2, (y1 - y0) / 2, (x1 - x0) / 2
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        labels[inside] = c
        edge = inside ^ np.roll(inside, 1, 0) | inside ^ np.roll(inside, 1, 1)
        void |= edge
    image = CLASS_COLORS[labels].astype(np.float32) + _texture(rng, h, w)
    mask = np.where(void, 255, labels).astype(np.uint8)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), mask


def _palette() -> list[int]:
    pal = np.zeros((256, 3), dtype=np.uint8)
    pal[:NUM_CLASSES] = CLASS_COLORS
    pal[255] = (224, 224, 192)
    return pal.reshape(-1).tolist()


def make_voc_dataset(data_dir: str | Path, *, num_train: int = 8, num_val: int = 6, seed: int = 0) -> Path:
    """Write data_dir/VOCSegmentation/{images, SegmentationClass, SegmentationClassAug, sets/*.txt}; return data_dir.

    Lists: trainaug (num_train images), train (the first half of trainaug), val (num_val images). Every image has
    background plus 4 object classes chosen round-robin, so each split covers all 21 classes when it has >= 5
    images.
    """
    data_dir = Path(data_dir)
    root = data_dir / "VOCSegmentation"
    for sub in ("images", "SegmentationClass", "SegmentationClassAug", "sets"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = {"trainaug": [f"2012_{i:06d}" for i in range(num_train)], "val": [f"2011_{i:06d}" for i in range(num_val)]}
    for split_names in names.values():
        for i, name in enumerate(split_names):
            classes = [1 + (4 * i + k) % (NUM_CLASSES - 1) for k in range(4)]
            image, mask = make_example(rng, _SIZES[i % len(_SIZES)], classes)
            Image.fromarray(image).save(root / "images" / f"{name}.jpg", quality=95)
            Image.fromarray(mask, mode="L").save(root / "SegmentationClassAug" / f"{name}.png")
            pal = Image.fromarray(mask, mode="L").convert("P")
            pal.putpalette(_palette())
            pal.save(root / "SegmentationClass" / f"{name}.png")
    (root / "sets" / "trainaug.txt").write_text("\n".join(names["trainaug"]) + "\n")
    (root / "sets" / "train.txt").write_text("\n".join(names["trainaug"][: max(1, num_train // 2)]) + "\n")
    (root / "sets" / "val.txt").write_text("\n".join(names["val"]) + "\n")
    return data_dir


def pixel_classes(images: np.ndarray) -> np.ndarray:
    """Class of every pixel of ImageNet-normalised images (B, H, W, 3), by the nearest class colour."""
    rgb = (images * IMAGENET_STD + IMAGENET_MEAN) * 255.0
    d = ((rgb[..., None, :] - CLASS_COLORS.astype(np.float32)) ** 2).sum(-1)
    return d.argmin(-1)


def oracle_features(images: np.ndarray, *, patch_size: int, noise: float = 0.05, seed: int = 0) -> np.ndarray:
    """(B, h, w, 21): per patch, the fraction of its pixels of each class, plus N(0, noise) noise."""
    b, hh, ww, _ = images.shape
    h, w = hh // patch_size, ww // patch_size
    onehot = np.eye(NUM_CLASSES, dtype=np.float32)[pixel_classes(images)]
    patches = onehot[:, : h * patch_size, : w * patch_size].reshape(b, h, patch_size, w, patch_size, -1)
    feats = patches.mean(axis=(2, 4))
    rng = np.random.default_rng(seed + int(1e3 * float(np.abs(images).sum()) % 1e6))
    return feats + rng.normal(0.0, noise, size=feats.shape).astype(np.float32)


def noise_features(images: np.ndarray, *, patch_size: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    """(B, h, w, dim) standard normal features that carry no information about the image."""
    b, hh, ww, _ = images.shape
    rng = np.random.default_rng(seed + int(1e3 * float(np.abs(images).sum()) % 1e6))
    return rng.normal(size=(b, hh // patch_size, ww // patch_size, dim)).astype(np.float32)
