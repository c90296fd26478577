"""What the explorer embeds, computed once in Python, and the similarity rules the page applies.

Images: each model sees the whole image resized to size x size (as the evaluation protocols resize), the page
shows it at its own aspect ratio (a JPEG whose longer side is at most `size`), and the patch grid is stretched
over it. Features: each model's final-norm patch tokens, L2-normalised, projected onto their `dims` leading
principal axes and stored as int8 codes with one scale per axis.

The axes are uncentred (the top eigenvectors of the second-moment matrix X^T X of the unit vectors): for unit
vectors these keep dot products, i.e. the cosine similarities the page shows, best in the least-squares sense
(Eckart-Young), whereas centred vectors would give other cosines (without the direction all patches share).
The page then takes the cosine of the decoded vectors, so a self-similarity is exactly 1. How much this
reduction changes the cosines is measured here on sampled queries and stated on the page.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm import tqdm

from evaluation.features import FeatureExtractor, load_model, resize_image
from evaluation.visualize import pca_rgb
from input_pipeline.decode import decode_rgb
from input_pipeline.errors import UndecodableImageError
from input_pipeline.sample_data import sample_image_paths
from input_pipeline.sources import IMAGE_EXTENSIONS, list_images
from input_pipeline.views import normalize
from neco_jax.errors import CheckpointError, ConfigError, DatasetError
from neco_jax.l2_norm import l2_normalize
from neco_jax.precision import true_float32

SAMPLE = "sample"  # --images=sample: the bundled photos (input_pipeline/sample_data.py)
JPEG_QUALITY = 85
CODE_MAX = 127  # int8 codes in [-127, 127]: symmetric, so a scale maps both signs alike
ERROR_QUERIES = 256  # sampled query patches for the stated similarity error

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ExploreImage:
    name: str
    pixels: np.ndarray  # (H, W, 3) uint8, as decoded (EXIF orientation applied)

    def display_jpeg(self, size: int) -> tuple[bytes, int, int]:
        """The JPEG the page shows (aspect kept, longer side at most `size`) and its width and height."""
        image = Image.fromarray(self.pixels)
        image.thumbnail((size, size), Image.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        return buffer.getvalue(), image.width, image.height


@dataclasses.dataclass(frozen=True)
class ModelFeatures:
    """One model's embedded features: int8 codes (N, h * w, dims) with per-axis scales, and its PCA-RGB colouring."""

    name: str
    codes: np.ndarray  # (N, h * w, dims) int8
    scales: np.ndarray  # (dims,) float32
    pca_rgb: np.ndarray  # (N, h, w, 3) uint8: the first three centred principal components of the full features
    embed_dim: int
    retained: float  # fraction of the unit vectors' energy the `dims` axes keep
    similarity_error: dict  # {"mean", "max"}: |cosine of the full features - cosine of the embedded ones|

    @property
    def dims(self) -> int:
        return int(self.codes.shape[-1])

    def unit_vectors(self) -> np.ndarray:
        """The decoded features, L2-normalised: (N, h * w, dims) float32, as the page decodes them."""
        return decode(self.codes, self.scales)


@dataclasses.dataclass(frozen=True)
class Explorer:
    """Everything the page and the PNG figure show."""

    images: list[ExploreImage]
    models: list[ModelFeatures]
    size: int  # the models' input side in pixels
    patch_size: int
    top_k: int

    @property
    def grid(self) -> tuple[int, int]:
        return self.size // self.patch_size, self.size // self.patch_size


# ----------------------------------------------------------------------------------------------------------------
# Images.


def image_paths(specs: Sequence[str], max_images: int) -> list[tuple[str, str]]:
    """(name, path) of the first `max_images` images of `specs`: folders (every image under them, sorted; named by
    their path inside the folder), image files (named by file name), or `sample` (the bundled photos)."""
    found: list[tuple[str, str]] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            try:
                files = list_images(spec)
            except DatasetError:
                raise DatasetError(
                    f"--images={spec}: no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...) in this folder; "
                    "give a folder of images or image files"
                ) from None
            found += [(os.path.relpath(f, spec), f) for f in files]
        elif path.is_file():
            found.append((path.name, spec))
        elif spec == SAMPLE:
            found += [(os.path.basename(f), f) for f in sample_image_paths()]
        else:
            raise DatasetError(f"--images={spec} does not exist; give a folder of images, image files or 'sample'")
    if not found:
        raise DatasetError("no images given; pass --images=FOLDER (or image files, or 'sample')")
    return found[:max_images]


def read_image(name: str, path: str) -> ExploreImage:
    try:
        with open(path, "rb") as f:
            image = decode_rgb(f.read())
    except (OSError, UndecodableImageError) as err:
        raise DatasetError(f"{path} is not a readable image ({err}); remove it from --images or replace it") from None
    return ExploreImage(name, np.asarray(image))


def model_inputs(images: Sequence[ExploreImage], size: int) -> np.ndarray:
    """(N, size, size, 3) float32: every image resized to size x size (the protocols' PIL bilinear), normalised."""
    return normalize(np.stack([resize_image(image.pixels, size) for image in images]))


# ----------------------------------------------------------------------------------------------------------------
# Models and features.


def load_models(checkpoints: Sequence[str], which: str, size: int) -> tuple[list, int]:
    """Every model, loaded before any feature is computed (a checkpoint that does not load stops the command early),
    and their one patch size, which `size` must be a multiple of."""
    models = []
    for source in checkpoints:
        model = load_model(source, which=which)
        log.info("loaded %s: %s, patch %d", source, model.config.arch, model.config.patch_size)
        models.append(model)
    patches = sorted({int(m.config.patch_size) for m in models})
    if len(patches) > 1:
        raise CheckpointError(
            f"the checkpoints have patch sizes {patches}; compare models of one patch size (one patch grid)"
        )
    if size % patches[0]:
        raise ConfigError(
            f"--size={size} is not a multiple of the patch size {patches[0]}; use e.g. {size // patches[0] * patches[0]}"
        )
    return models, patches[0]


@true_float32  # float32 features are float32 on GPUs too
def model_features(
    images: Sequence[ExploreImage], models: Sequence, names: Sequence[str], *, size: int, batch_size: int
):
    """Every model's (N, h, w, D) patch features of the images at size x size (a multiple of the patch size)."""
    inputs = model_inputs(images, size)
    return [patch_features(FeatureExtractor(m, name=n), inputs, batch_size) for m, n in zip(models, names)]


def patch_features(extractor: FeatureExtractor, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """(N, h, w, D) float32 patch tokens, in batches of one shape (the last one zero-padded): one compilation."""
    n = len(inputs)
    batch_size = min(batch_size, n)
    out = []
    with tqdm(total=n, desc=f"features of {extractor.name}", unit="img") as bar:
        for start in range(0, n, batch_size):
            batch = inputs[start : start + batch_size]
            real = len(batch)
            if real < batch_size:
                batch = np.concatenate([batch, np.zeros((batch_size - real, *batch.shape[1:]), batch.dtype)])
            out.append(extractor(batch)[:real])
            bar.update(real)
    return np.concatenate(out)


def principal_axes(unit: np.ndarray, dims: int) -> tuple[np.ndarray, float]:
    """The `dims` leading uncentred principal axes of (M, D) vectors, (dims, D) float32 with the largest-|.|
    entry of each positive, and the fraction of sum ||x||^2 they keep."""
    x = unit.astype(np.float64)
    evals, evecs = np.linalg.eigh(x.T @ x)
    order = np.argsort(evals)[::-1][:dims]
    axes = evecs[:, order].T
    axes *= np.sign(axes[np.arange(dims), np.argmax(np.abs(axes), axis=1)])[:, None]
    return axes.astype(np.float32), float(evals[order].sum() / max(evals.sum(), 1e-30))


def encode_features(name: str, features: np.ndarray, dims: int, seed: int = 0) -> ModelFeatures:
    """The page's copy of one model's (N, h, w, D) patch features (see the module docstring)."""
    n, h, w, d = features.shape
    dims = min(dims, d)
    unit = np.asarray(l2_normalize(jnp.asarray(features.reshape(-1, d), jnp.float32)))
    axes, retained = principal_axes(unit, dims)
    reduced = unit @ axes.T
    scales = (np.abs(reduced).max(axis=0) / CODE_MAX).astype(np.float32)
    scales[scales == 0] = 1.0
    codes = np.clip(np.rint(reduced / scales), -CODE_MAX, CODE_MAX).astype(np.int8)
    return ModelFeatures(
        name=name,
        codes=codes.reshape(n, h * w, dims),
        scales=scales,
        pca_rgb=pca_rgb(unit.reshape(n, h, w, d)),
        embed_dim=d,
        retained=retained,
        similarity_error=similarity_error(unit, decode(codes, scales), seed),
    )


def decode(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Unit vectors from int8 codes (..., dims) and per-axis scales: codes x scales in float32, L2-normalised."""
    return np.asarray(l2_normalize(jnp.asarray(codes.astype(np.float32) * scales)))


def similarity_error(full: np.ndarray, embedded: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Mean and largest |cos(full) - cos(embedded)| between sampled query patches and every patch."""
    m = len(full)
    queries = np.random.default_rng(seed).choice(m, min(ERROR_QUERIES, m), replace=False)
    diff = np.abs(full[queries] @ full.T - embedded[queries] @ embedded.T)
    return {"mean": float(diff.mean()), "max": float(diff.max())}


# ----------------------------------------------------------------------------------------------------------------
# What the page shows for a query patch (the PNG figure draws the same).


def similarity_maps(unit: np.ndarray, image: int, row: int, col: int, grid: tuple[int, int]) -> np.ndarray:
    """(N, h, w) cosine similarity of every patch to patch (row, col) of `image`, from unit vectors (N, h * w, d)."""
    h, w = grid
    query = unit[image, row * w + col]
    return (unit @ query).reshape(len(unit), h, w)


def nearest_patches(sims: np.ndarray, k: int, exclude: int | None = None) -> np.ndarray:
    """Flat indices of the `k` most similar patches of one image's (h, w) map, most similar first; `exclude`
    (the query patch itself, on the query image) is never one of them."""
    flat = sims.reshape(-1).astype(np.float64)  # a copy
    if exclude is not None:
        flat[exclude] = -np.inf
    order = np.argsort(-flat, kind="stable")
    return order[: min(k, flat.size - (exclude is not None))]


def check_query(num_images: int, grid: tuple[int, int], image: int, row: int, col: int) -> None:
    """A one-line error unless (image, row, col) is a patch of the page."""
    h, w = grid
    if not 0 <= image < num_images:
        raise ConfigError(f"image {image} is out of range: there are {num_images} images (counted from 0)")
    if not (0 <= row < h and 0 <= col < w):
        raise ConfigError(f"patch {row},{col} is outside the {h}x{w} patch grid (rows and columns count from 0)")
