"""Frozen patch features for the dense evaluations: model loading, the protocols' resizing, batched extraction.

The protocols only ever see a `features_fn(images) -> (B, h, w, D)` callable over ImageNet-normalised float32
NHWC batches, so tests can hand them an oracle instead of a network. `FeatureExtractor` is the real one: the
backbone's final-norm patch tokens (and on request the last block's CLS attention), jitted once and sharded
over every device along a 1-D `data` mesh (batches padded to a multiple of the device count).

Resizing follows the reference transforms: images through PIL bilinear (torchvision's `Resize` on PIL images,
which antialiases), masks through PIL nearest, then torch-style nearest (`F.interpolate(mode="nearest")`,
src = floor(dst * in / out)) from the input size down to the evaluation size.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image
from tqdm import tqdm

from evaluation.datasets import SegmentationDataset
from input_pipeline.views import normalize
from neco_jax import load_backbone, sharding
from neco_jax.convert.params import flat_params
from neco_jax.errors import CheckpointError, NonFiniteError, UserError
from neco_jax.models.feature_forward import feature_forward
from neco_jax.models.vit_config import DTYPES
from neco_jax.settings import ModelSettings, from_section

log = logging.getLogger(__name__)

FeaturesFn = Callable[[np.ndarray], np.ndarray]


# ----------------------------------------------------------------------------------------------------------------
# Resizing and normalisation (host side, as the reference's PIL transforms).


def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> uint8 (h, w, 3), PIL bilinear with antialias (torchvision `Resize` on PIL)."""
    h, w = (size, size) if isinstance(size, int) else size
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Label map (H, W) uint8 -> (h, w), PIL nearest (torchvision `Resize(NEAREST)` on PIL)."""
    h, w = (size, size) if isinstance(size, int) else size
    return np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source indices of torch `F.interpolate(mode='nearest')`: floor(dst * (in / out)) in float32, clamped."""
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, in_size - 1)


def nearest_resize(x: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Torch-style nearest resize of the two axes after the leading ones: (..., H, W) -> (..., h, w)."""
    h, w = (size, size) if isinstance(size, int) else size
    rows = nearest_indices(x.shape[-2], h)
    cols = nearest_indices(x.shape[-1], w)
    return x[..., rows[:, None], cols[None, :]]


@dataclasses.dataclass(frozen=True)
class Batch:
    """One evaluation batch: normalised images, masks at the eval size, and the dataset indices they came from."""

    images: np.ndarray  # (B, S, S, 3) float32
    masks: np.ndarray  # (B, m, m) uint8
    indices: np.ndarray  # (B,) int64


def load_eval_example(dataset: SegmentationDataset, i: int, image_size: int, mask_size: int) -> tuple:
    """Image resized to `image_size` (uint8) and mask resized to `image_size` (PIL nearest) then to `mask_size`
    (torch nearest), as the reference val transforms and its in-model mask downsampling."""
    image, mask = dataset[i]
    mask = resize_mask(mask, image_size)
    if mask_size != image_size:
        mask = nearest_resize(mask, mask_size)
    return resize_image(image, image_size), mask


def iterate_batches(
    dataset: SegmentationDataset,
    *,
    batch_size: int,
    image_size: int,
    mask_size: int,
    indices: Sequence[int] | None = None,
    load_fn: Callable | None = None,
    num_threads: int = 8,
    desc: str | None = None,
) -> Iterator[Batch]:
    """Batches in `indices` order (default: all), decoded by a thread pool one batch ahead.

    `load_fn(dataset, i)` -> (uint8 image, uint8 mask) replaces the val loading (e.g. random crops for training).
    """
    indices = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)
    if load_fn is None:

        def load_fn(ds, i):
            return load_eval_example(ds, i, image_size, mask_size)

    chunks = [indices[s : s + batch_size] for s in range(0, len(indices), batch_size)]
    with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:

        def submit(chunk):
            return [pool.submit(load_fn, dataset, int(i)) for i in chunk]

        pending = submit(chunks[0]) if chunks else []
        with tqdm(total=len(indices), desc=desc, unit="img", disable=desc is None) as bar:
            for n, chunk in enumerate(chunks):
                results = [f.result() for f in pending]
                pending = submit(chunks[n + 1]) if n + 1 < len(chunks) else []
                images = normalize(np.stack([r[0] for r in results]))
                masks = np.stack([r[1] for r in results])
                bar.update(len(chunk))
                yield Batch(images, masks, chunk)


# ----------------------------------------------------------------------------------------------------------------
# Models.


def load_from_workdir(workdir: str | Path, which: str = "teacher"):
    """The student or teacher backbone of a training workdir (`python main.py --workdir=...`).

    Its `export/<which>` folder when training finished and exported, else the newest intact checkpoint under
    `checkpoints/` (newer damaged ones are named in a warning and left in place), rebuilt with the architecture
    of the run's `config.json`.
    """
    if which not in ("student", "teacher"):
        raise CheckpointError(f"checkpoint_model must be 'student' or 'teacher', got {which!r}")
    workdir = Path(workdir)
    exported = workdir / "export" / which
    if exported.is_dir():
        return load_backbone(exported)
    config_file = workdir / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} is missing; {workdir} is not a complete training workdir")
    # orbax (through neco_jax.checkpoint): a slow import, only for a training workdir
    from neco_jax import checkpoint as ckpt_lib
    from neco_jax import train_state as ts
    from neco_jax.models import VisionTransformer

    directory = workdir / "checkpoints"
    steps = ckpt_lib.finished_steps(directory)
    if not steps:
        raise CheckpointError(f"{directory} holds no finished checkpoint yet")
    model = from_section(ModelSettings, json.loads(config_file.read_text())["model"])
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def restore(step: int):
        saved = ckpt_lib.saved_tree(directory, step)  # empty if unreadable: restore_part then names the file
        if saved and not saved[which]:
            raise CheckpointError(
                f"{workdir} trained without a teacher (loss.use_teacher=False); use checkpoint_model=student"
            )
        has_mask_token = "mask_token" in saved[which]["backbone"] if saved else None
        _, teacher = ts.vit_configs(model, has_mask_token)  # the teacher's config: no drop path
        graphdef, abstract = ts.split(nnx.eval_shape(lambda: VisionTransformer(teacher, rngs=nnx.Rngs(0))))
        part = ckpt_lib.restore_part(directory, step, {which: {"backbone": ckpt_lib.abstract_like(abstract, device)}})
        return nnx.merge(graphdef, part[which]["backbone"])

    def on_damaged(step: int, damage: str, good: int) -> None:
        log.warning(
            "checkpoint %s/%d is damaged (%s); using step %d, the newest intact checkpoint. "
            "Remove the damaged one with: rm -r %s/%d",
            directory,
            step,
            damage,
            good,
            directory,
            step,
        )

    return ckpt_lib.newest_intact(str(directory), steps, restore, on_damaged)[1]


def load_model(source: str, *, arch: str | None = None, which: str = "teacher"):
    """A backbone from anything `neco_jax.load_backbone` accepts, or from a training workdir (`which` model)."""
    if not source:
        raise CheckpointError("no checkpoint given; pass --config.checkpoint=<name, file or folder>")
    path = Path(source)
    if path.is_dir() and (path / "checkpoints").is_dir():
        return load_from_workdir(path, which)
    return load_backbone(source, arch=arch or None, which=which)  # `which` picks the model of NeCo checkpoints


def with_compute_dtype(model, dtype: str):
    """The same weights in a model whose config computes in `dtype` (parameters stay fp32; the model keeps
    LayerNorm/softmax in fp32 itself)."""
    if model.config.dtype == dtype:
        return model
    new_config = dataclasses.replace(model.config, dtype=dtype)
    abstract = nnx.eval_shape(lambda: type(model)(new_config, rngs=nnx.Rngs(0)))
    nnx.update(abstract, nnx.state(model))
    return abstract


def without_registers(model):
    """The same weights in a model built without register tokens, as NeCo's
    ``experiments/fully_unsup_seg/fully_unsup_seg.py`` builds its ViT (``model_func(patch_size=...)``: no
    registers, position-table resampling with offset 0.1 and no antialias; the register weights are dropped by
    its ``load_state_dict(strict=False)``). A model without registers is returned as it is."""
    if not model.config.num_register_tokens:
        return model
    new_config = dataclasses.replace(
        model.config, num_register_tokens=0, interpolate_offset=0.1, interpolate_antialias=False
    )
    graphdef, state = nnx.split(nnx.eval_shape(lambda: type(model)(new_config, rngs=nnx.Rngs(0))))
    weights = nnx.to_pure_dict(nnx.state(model))
    weights.pop("register_tokens")
    nnx.replace_by_pure_dict(state, weights)
    return nnx.merge(graphdef, state)


def _check_finite_weights(model, name: str) -> None:
    """Refuse a model with a NaN or infinite parameter (a diverged run), naming the parameters."""
    bad = [path for path, value in flat_params(model).items() if not bool(jnp.isfinite(value).all())]
    if bad:
        raise NonFiniteError(
            f"{name} has non-finite weights (NaN or inf) in {len(bad)} parameter(s), e.g. {', '.join(bad[:4])}; "
            "no score is computed from it: evaluate an earlier checkpoint"
        )


class FeatureExtractor:
    """Jitted, data-parallel final-norm patch tokens of a frozen backbone.

    `extractor(images)` -> (B, h, w, D) float32; `extractor.with_attention(images)` -> (features, CLS attention
    (B, heads, h, w)). Images are (B, H, W, 3) float32 ImageNet-normalised; B need not divide the device count.
    """

    def __init__(self, model, *, dtype: str = "float32", name: str = "the model"):
        if dtype not in DTYPES:
            raise UserError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        self.name, self.dtype = name, dtype
        _check_finite_weights(model, name)
        model = with_compute_dtype(model, dtype)
        self.patch_size = int(model.config.patch_size)
        self.embed_dim = int(model.config.embed_dim)
        self.mesh = sharding.make_mesh()
        self._n = self.mesh.devices.size
        replicated = sharding.replicated(self.mesh)
        self._data = sharding.batch_sharding(self.mesh)
        graphdef, state = nnx.split(model)
        self._state = jax.device_put(state, replicated)
        self._forward = jax.jit(
            feature_forward(graphdef, self.patch_size),
            static_argnums=2,
            in_shardings=(replicated, self._data),
            out_shardings=self._data,
        )

    def _run(self, images: np.ndarray, with_attention: bool):
        images = np.asarray(images, dtype=np.float32)
        b = images.shape[0]
        if images.shape[1] % self.patch_size or images.shape[2] % self.patch_size:
            raise UserError(
                f"image size {images.shape[1]}x{images.shape[2]} is not a multiple of the patch size {self.patch_size}"
            )
        pad = -b % self._n
        if pad:
            images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
        out = self._forward(self._state, jax.device_put(images, self._data), with_attention)
        out = jax.tree.map(lambda a: np.asarray(a)[:b], out)
        broken = np.zeros(b, bool)
        for a in jax.tree.leaves(out):
            broken |= ~np.isfinite(a.reshape(b, -1)).all(axis=1)
        if broken.any():
            hint = "; try dtype=float32" if self.dtype == "bfloat16" else ""
            raise NonFiniteError(
                f"{self.name} gives non-finite features (NaN or inf) for {broken.sum()} of {b} images of a batch "
                f"although its weights are finite (an overflow{hint}); no score is computed from them"
            )
        return out

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self._run(images, False)

    def with_attention(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._run(images, True)


def extract_features(
    features_fn: FeaturesFn,
    dataset: SegmentationDataset,
    *,
    image_size: int,
    mask_size: int,
    batch_size: int,
    indices: Sequence[int] | None = None,
    num_threads: int = 8,
    desc: str | None = "features",
) -> tuple[np.ndarray, np.ndarray]:
    """Features (N, h, w, D) float32 and eval masks (N, m, m) uint8 of a dataset (or its `indices`)."""
    feats, masks = [], []
    for batch in iterate_batches(
        dataset,
        batch_size=batch_size,
        image_size=image_size,
        mask_size=mask_size,
        indices=indices,
        num_threads=num_threads,
        desc=desc,
    ):
        feats.append(np.asarray(features_fn(batch.images), dtype=np.float32))
        masks.append(batch.masks)
    return np.concatenate(feats), np.concatenate(masks)
