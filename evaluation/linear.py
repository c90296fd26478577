"""Linear segmentation (NeCo `linear_finetune.py` + `eval_linear.py`, Leopart protocol).

A 1x1 convolution (a (D, C) matrix and a bias) on frozen patch features that are bilinearly upsampled to
100x100, trained with cross-entropy (ignore index) against masks nearest-downsampled to 100x100:
SGD lr 0.01, momentum 0.9, weight decay 1e-4 (torch semantics: decay added to the gradient, bias included),
25 epochs with lr x0.1 every 20, batch 128, paired RandomResizedCrop(448, scale (0.8, 1)) and horizontal flips.
Final evaluation on the whole val split at 448x448, argmax, mIoU over all classes without matching.

By default the head scored is the one after the last epoch. The reference instead keeps the top-3 heads by a
val mIoU measured after every epoch (at 100x100; for VOC on 1,408 images, as its val loader drops the last
partial batch) and evaluates the best, i.e. it selects on the evaluation set; ``select_best`` does the same
(the earliest of equal scores, rounded to 6 decimals as the reference logs them). With the x0.1 step at
epoch 20 the last head is normally the best one anyway.
`cache_features` trades the augmentation for speed: the backbone then runs once on un-augmented images.

Upsampling then projecting equals projecting then upsampling (bilinear weights sum to one), so the head runs
on the patch grid and the C-channel logits are upsampled: same numbers, D/C times less work.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from PIL import Image
from tqdm import tqdm

from evaluation import metrics
from evaluation.datasets import SegmentationDataset
from evaluation.features import (
    FeaturesFn,
    extract_features,
    iterate_batches,
    nearest_resize,
    resize_image,
)
from evaluation.job_inputs import make_extractor, open_split
from evaluation.settings import from_config
from evaluation.visualize import save_segmentation_panels
from input_pipeline.views import CROP_RATIO, random_resized_crop_params
from neco_jax.errors import ConfigError, DatasetError


@dataclasses.dataclass(frozen=True)
class LinearSettings:
    """The protocol's knobs; the defaults are the reference's (NeCo ``experiments/linear_segmentation``).

    The job configs' ``config.linear`` is built from these defaults (see ``evaluation.settings``).
    """

    # SGD on the 1x1 head: lr, momentum, weight decay (added to the gradient, as torch.optim.SGD).
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # Epochs, and StepLR: lr x lr_gamma every lr_step_epochs epochs.
    epochs: int = 25
    lr_step_epochs: int = 20
    lr_gamma: float = 0.1
    # Head batch size, and whether the last partial batch of an epoch is dropped (the reference VOC and COCO
    # loaders drop it, its ADE20k and Cityscapes loaders keep it).
    batch_size: int = 128
    drop_last: bool = True
    # Shuffle the training set each epoch (the reference VOC and ADE20k loaders do not; COCO's does).
    shuffle: bool = False
    # Paired RandomResizedCrop(image_size, scale) and horizontal flip with probability hflip.
    crop_scale: tuple[float, float] = (0.8, 1.0)
    hflip: float = 0.5
    # Training loss resolution (features bilinearly upsampled, masks nearest) and final evaluation resolution.
    train_mask_size: int = 100
    eval_mask_size: int = 448
    # Compute backbone features once (no augmentation then) instead of on every augmented batch.
    cache_features: bool = False
    # Seed of the head init, crops, flips and shuffling (the reference seeds 400).
    seed: int = 400
    # Which head is scored: False = the last epoch's; True = the epoch with the best val mIoU measured after every
    # epoch at select_mask_size, as the reference's ModelCheckpoint(monitor="miou_val") keeps it (this selects on
    # the evaluation set). select_drop_last scores only whole batches of val images (the reference VOC loader).
    select_best: bool = False
    select_mask_size: int = 100
    select_drop_last: bool = False


# ----------------------------------------------------------------------------------------------------------------
# Paired augmentation (torchvision RandomResizedCrop.get_params + PIL resizes, horizontal flip).


def augmented_example(dataset, i, *, crop, flip: bool, size: int, mask_size: int):
    """Image and mask cropped to `crop` (top, left, h, w), resized to `size` (bilinear / nearest), optionally
    mirrored; the mask then goes to `mask_size` with torch-style nearest."""
    image, mask = dataset[i]
    top, left, h, w = crop
    box = (left, top, left + w, top + h)
    image = np.asarray(Image.fromarray(image).crop(box).resize((size, size), Image.BILINEAR))
    mask = np.asarray(Image.fromarray(mask).crop(box).resize((size, size), Image.NEAREST))
    if flip:
        image, mask = image[:, ::-1], mask[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(nearest_resize(mask, mask_size))


# ----------------------------------------------------------------------------------------------------------------
# The head and its training step.


def init_head(key: jax.Array, dim: int, num_classes: int) -> dict:
    """torch `Conv2d(dim, C, 1)` default init: weight and bias ~ U(-1/sqrt(dim), 1/sqrt(dim))."""
    bound = 1.0 / math.sqrt(dim)
    kw, kb = jax.random.split(key)
    return {
        "kernel": jax.random.uniform(kw, (dim, num_classes), jnp.float32, -bound, bound),
        "bias": jax.random.uniform(kb, (num_classes,), jnp.float32, -bound, bound),
    }


def head_logits(params: dict, features: jax.Array, size: int) -> jax.Array:
    """(B, h, w, D) -> (B, size, size, C): 1x1 head, then bilinear upsampling (align_corners=False)."""
    logits = jnp.einsum("bhwd,dc->bhwc", features, params["kernel"], precision=jax.lax.Precision.HIGHEST)
    logits = logits + params["bias"]
    b, _, _, c = logits.shape
    return jax.image.resize(logits, (b, size, size, c), method="bilinear", antialias=False)


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, ignore_index: int) -> jax.Array:
    """Mean cross-entropy over pixels whose label is not `ignore_index` (torch CrossEntropyLoss(ignore_index))."""
    valid = labels != ignore_index
    safe = jnp.where(valid, labels, 0).astype(jnp.int32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
    return jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def make_optimizer(settings: LinearSettings, steps_per_epoch: int) -> optax.GradientTransformation:
    """torch SGD(momentum, weight_decay) with StepLR stepped once per epoch."""
    drops = {
        e * steps_per_epoch: settings.lr_gamma
        for e in range(settings.lr_step_epochs, settings.epochs, settings.lr_step_epochs)
    }
    schedule = optax.piecewise_constant_schedule(settings.lr, drops)
    return optax.chain(
        optax.add_decayed_weights(settings.weight_decay), optax.sgd(schedule, momentum=settings.momentum)
    )


def make_train_step(optimizer, *, mask_size: int, ignore_index: int):
    @jax.jit
    def step(params, opt_state, features, labels):
        def loss_fn(p):
            return masked_cross_entropy(head_logits(p, features, mask_size), labels, ignore_index)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


@functools.partial(jax.jit, static_argnames="size")
def _predict(params, features, size: int):
    return jnp.argmax(head_logits(params, features, size), axis=-1).astype(jnp.int32)


def predict(params: dict, features: np.ndarray, size: int) -> np.ndarray:
    """Class map (B, size, size) of the head on (B, h, w, D) features."""
    return np.asarray(_predict(params, jnp.asarray(features), size))


# ----------------------------------------------------------------------------------------------------------------
# The protocol.


def _epoch_order(rng: np.random.Generator, n: int, settings: LinearSettings) -> list[np.ndarray]:
    order = rng.permutation(n) if settings.shuffle else np.arange(n)
    stop = n - n % settings.batch_size if settings.drop_last else n
    return [order[s : min(s + settings.batch_size, stop)] for s in range(0, stop, settings.batch_size)]


def train_head(
    train: SegmentationDataset,
    features_fn: FeaturesFn,
    *,
    settings: LinearSettings,
    image_size: int,
    num_threads: int = 8,
    val_score: Callable[[dict], float] | None = None,
) -> tuple[dict, list[float], list[float]]:
    """Trained head parameters, the mean loss of every epoch, and ``val_score`` of every epoch's head when given,
    in which case the head returned is the best-scoring one (the earliest of equal scores)."""
    n = len(train)
    if settings.drop_last and n < settings.batch_size:
        raise ValueError(f"{n} training images are fewer than one batch of {settings.batch_size} with drop_last")
    rng = np.random.default_rng(settings.seed)
    params = None
    cached = None
    if settings.cache_features:
        cached = extract_features(
            features_fn,
            train,
            image_size=image_size,
            mask_size=settings.train_mask_size,
            batch_size=settings.batch_size,
            num_threads=num_threads,
            desc="train features",
        )
    sizes = None if cached else [_image_hw(train, i) for i in range(n)]
    steps_per_epoch = len(_epoch_order(np.random.default_rng(0), n, settings))
    losses, scores, best = [], [], None
    for epoch in range(settings.epochs):
        batches = _epoch_order(rng, n, settings)
        crops = {}
        if sizes is not None:
            for i in range(n):
                height, width = sizes[i]
                crop = random_resized_crop_params(rng, width, height, settings.crop_scale, CROP_RATIO)
                crops[i] = (crop, rng.random() < settings.hflip)

        def load(ds, i, crops=crops):
            crop, flip = crops[i]
            return augmented_example(ds, i, crop=crop, flip=flip, size=image_size, mask_size=settings.train_mask_size)

        epoch_losses = []
        source = (
            _cached_batches(cached, batches)
            if cached
            else _augmented_batches(train, batches, load, features_fn, image_size, settings, num_threads, epoch)
        )
        for feats, labels in source:
            if params is None:
                params = init_head(jax.random.key(settings.seed), feats.shape[-1], train.num_classes)
                optimizer = make_optimizer(settings, steps_per_epoch)
                opt_state = optimizer.init(params)
                step = make_train_step(optimizer, mask_size=settings.train_mask_size, ignore_index=train.ignore_index)
            params, opt_state, loss = step(params, opt_state, jnp.asarray(feats), jnp.asarray(labels))
            epoch_losses.append(float(loss))
        losses.append(float(np.mean(epoch_losses)))
        line = f"epoch {epoch + 1}/{settings.epochs}: loss {losses[-1]:.4f}"
        if val_score is not None:
            scores.append(round(float(val_score(params)), 6))  # the reference logs miou_val rounded so
            if best is None or scores[-1] > scores[best[0]]:
                best = (epoch, params)
            line += f", val mIoU {100 * scores[-1]:.2f} %"
        tqdm.write(line)
    return (best[1] if best else params), losses, scores


def _image_hw(dataset: SegmentationDataset, i: int) -> tuple[int, int]:
    try:
        with Image.open(dataset.image_paths[i]) as im:
            return im.height, im.width
    except OSError as e:
        raise DatasetError(f"cannot read image {dataset.image_paths[i]} ({e}); replace or remove the file") from e


def _cached_batches(cached, batches):
    feats, masks = cached
    for b in batches:
        yield feats[b], masks[b]


def _augmented_batches(train, batches, load, features_fn, image_size, settings, num_threads, epoch):
    flat = np.concatenate(batches) if batches else np.zeros((0,), np.int64)
    it = iterate_batches(
        train,
        batch_size=settings.batch_size,
        image_size=image_size,
        mask_size=settings.train_mask_size,
        indices=flat,
        load_fn=load,
        num_threads=num_threads,
        desc=f"epoch {epoch + 1}/{settings.epochs}",
    )
    for batch in it:
        yield features_fn(batch.images), batch.masks


def evaluate_head(
    params: dict,
    val: SegmentationDataset,
    features_fn: FeaturesFn,
    *,
    image_size: int,
    eval_mask_size: int,
    batch_size: int = 32,
    num_threads: int = 8,
    num_examples: int = 0,
) -> dict:
    """mIoU (no matching, all classes) of the head on the whole val split at `eval_mask_size`."""
    conf = np.zeros((val.num_classes, val.num_classes), np.int64)
    examples = []
    for batch in iterate_batches(
        val,
        batch_size=batch_size,
        image_size=image_size,
        mask_size=eval_mask_size,
        num_threads=num_threads,
        desc="val",
    ):
        pred = predict(params, features_fn(batch.images), eval_mask_size)
        conf += metrics.confusion_matrix(pred, batch.masks, num_classes=val.num_classes, ignore_index=val.ignore_index)
        for j in range(min(len(pred), num_examples - len(examples))):
            image = resize_image(val.image(int(batch.indices[j])), eval_mask_size)
            examples.append((image, batch.masks[j], pred[j].astype(np.uint8)))
    score, per_class = metrics.miou_from_confusion(conf, "none")
    return {"miou": score, "per_class_iou": per_class.tolist(), "examples": examples}


def evaluate(
    train: SegmentationDataset,
    val: SegmentationDataset,
    features_fn: FeaturesFn,
    *,
    settings: LinearSettings,
    image_size: int,
    batch_size: int = 32,
    num_threads: int = 8,
    num_examples: int = 0,
) -> dict:
    """Train the head on `train`, score it on `val`: {"miou", "per_class_iou", "epoch_losses", "examples"}, and with
    ``select_best`` the per-epoch selection scores and the chosen epoch."""
    val_score = None
    if settings.select_best:
        val_score = selection_score(
            val, features_fn, settings=settings, image_size=image_size, batch_size=batch_size, num_threads=num_threads
        )
    params, losses, scores = train_head(
        train, features_fn, settings=settings, image_size=image_size, num_threads=num_threads, val_score=val_score
    )
    selected = {}
    if scores:
        selected = {"epoch_val_miou": scores, "selected_epoch": int(np.argmax(scores)) + 1}
    out = evaluate_head(
        params,
        val,
        features_fn,
        image_size=image_size,
        eval_mask_size=settings.eval_mask_size,
        batch_size=batch_size,
        num_threads=num_threads,
        num_examples=num_examples,
    )
    return {**out, "epoch_losses": losses, **selected, "train_images": len(train), "val_images": len(val)}


def selection_score(
    val: SegmentationDataset,
    features_fn: FeaturesFn,
    *,
    settings: LinearSettings,
    image_size: int,
    batch_size: int,
    num_threads: int,
) -> Callable[[dict], float]:
    """The reference's per-epoch ``miou_val`` as a function of the head: val features computed once, argmax at
    ``select_mask_size``, identity matching; with ``select_drop_last`` only whole batches of ``settings.batch_size``
    images (the reference VOC val loader's drop_last)."""
    n = len(val) - (len(val) % settings.batch_size if settings.select_drop_last else 0)
    if n <= 0:
        raise DatasetError(
            f"{len(val)} val images are fewer than one batch of {settings.batch_size}; set select_drop_last=False"
        )
    feats, masks = extract_features(
        features_fn,
        val,
        image_size=image_size,
        mask_size=settings.select_mask_size,
        batch_size=batch_size,
        indices=range(n),
        num_threads=num_threads,
        desc="val features for head selection",
    )

    def score(params: dict) -> float:
        conf = np.zeros((val.num_classes, val.num_classes), np.int64)
        for s in range(0, n, batch_size):
            pred = predict(params, feats[s : s + batch_size], settings.select_mask_size)
            conf += metrics.confusion_matrix(
                pred, masks[s : s + batch_size], num_classes=val.num_classes, ignore_index=val.ignore_index
            )
        return metrics.miou_from_confusion(conf, "none")[0]

    return score


def settings_from_config(config: ml_collections.ConfigDict) -> LinearSettings:
    return from_config(LinearSettings, config.linear)


def run(config: ml_collections.ConfigDict, model=None) -> dict:
    """The protocol entry of `python -m evaluation` (configs/eval/<dataset>_linear.py)."""
    settings = settings_from_config(config)
    lo, hi = settings.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"config.linear.crop_scale={settings.crop_scale}; need 0 < low <= high <= 1")
    if settings.epochs < 1 or settings.batch_size < 1 or settings.lr_step_epochs < 1:
        raise ConfigError("config.linear needs epochs, batch_size and lr_step_epochs >= 1")
    train = open_split(config, config.train_split)
    val = open_split(config, config.val_split)
    if settings.drop_last and len(train) < settings.batch_size:
        raise ConfigError(
            f"{len(train)} training images are fewer than config.linear.batch_size={settings.batch_size} "
            "with drop_last; lower the batch size or set config.linear.drop_last=False"
        )
    extractor = make_extractor(config, model)
    results = evaluate(
        train,
        val,
        extractor,
        settings=settings,
        image_size=config.image_size,
        batch_size=config.batch_size,
        num_threads=config.num_threads,
        num_examples=config.num_visualize,
    )
    examples = results.pop("examples")
    if examples:
        save_segmentation_panels(examples, Path(config.workdir) / "predictions", num_classes=val.num_classes)
    if val.class_names:
        results["class_names"] = list(val.class_names)
    return results
