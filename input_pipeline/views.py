"""NeCo's multi-crop views: crop geometry with the overlap rule, colour pipeline, and the crop-pair boxes.

Follows the original `NeCoTransforms` (vpariza/NeCo `src/neco_transforms.py`; docs/method.md) operation for operation on PIL
images: torchvision `RandomResizedCrop.get_params` semantics (integer boxes, 10 tries, central-crop fallback),
PIL crop + bilinear resize (PIL widens the filter when downsampling, i.e. antialiased), torchvision's PIL
colour ops, and `calculate_bboxes` in float32. Randomness comes from a NumPy `Generator` the caller seeds, so
the loader can derive it from (seed, epoch, index); the streams therefore differ from torch's, the
distributions do not.

The one deliberate change: the original redraws a crop until the overlap rule holds, with no limit. We redraw
at most `max_resample_tries` times, then use a fallback box that always intersects every global crop:
global crop k>0 becomes a copy of global crop 0, a local crop becomes the intersection of the global crops.
It satisfies the rule whenever global crop 0 covers more than 2 x min_intersection_crops of the image (always for
the default scales, except images so elongated that no crop can satisfy the rule: there the original hangs).

Where the colour ops run is `augment_on`: "device" (default) returns uint8 crops plus each crop's drawn colour
parameters, applied in the jitted train step by `input_pipeline.augment`; "host" applies the same parameters
with torchvision's PIL ops here and returns normalised float32 crops (the original's pipeline). Both draw the
same numbers from the same generator, in the original's order (the device batch carries them as float32,
so its factors and sigmas are those draws rounded to float32).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from input_pipeline.errors import ConfigError
from input_pipeline.settings import check, setting

# ImageNet mean and std of RGB in [0, 1] (torchvision's Normalize values used by DINO, NeCo and the evaluations).
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
# RandomResizedCrop's default aspect-ratio range (w/h), used by the training views and the evaluations' crops.
CROP_RATIO = (3 / 4, 4 / 3)
AUGMENT_ON = ("device", "host")
AUGMENT_NUMERICS = ("pil", "tensor")  # input_pipeline.augment's two rounding modes
# One crop's colour parameters, as the columns of the batch's `global_colour` / `local_colour` arrays:
# jitter applied (0/1); the jitter's op order (0 brightness, 1 contrast, 2 saturation, 3 hue); its factors
# (identity 1, 1, 1, 0 when not applied); grayscale (0/1); blur sigma (0 = no blur).
COLOUR_PARAMS = (
    "jitter",
    "order_0",
    "order_1",
    "order_2",
    "order_3",
    "brightness",
    "contrast",
    "saturation",
    "hue",
    "grayscale",
    "blur_sigma",
)
COL = {name: i for i, name in enumerate(COLOUR_PARAMS)}
NO_COLOUR = np.array([0, 0, 1, 2, 3, 1, 1, 1, 0, 0, 0], np.float64)  # identity parameters


@dataclasses.dataclass(frozen=True)
class ViewSettings:
    """The crops and colours of one training image (`config.data`, beside the loader's settings); defaults are
    the original ViT-S/14 DINOv2 recipe (518/98 px, 2 + 4 crops)."""

    SECTION = "data"

    # Global / local crop side in pixels.
    size_crops: tuple[int, ...] = setting((518, 98), at_least=1)
    # Number of global / local crops per image.
    nmb_samples: tuple[int, ...] = setting((2, 4), at_least=0)
    # RandomResizedCrop area fraction of the image, lower and upper bound (global, local).
    min_scale_crops: tuple[float, ...] = setting((0.25, 0.05), above=0, at_most=1)
    max_scale_crops: tuple[float, ...] = setting((1.0, 0.25), above=0, at_most=1)
    # A crop overlaps each earlier global crop by more than int(W * H * this) pixels (twice that between globals).
    min_intersection_crops: float = setting(0.01, above=0, below=1)
    # ColorJitter(0.8 s, 0.8 s, 0.8 s, 0.2 s) with s this (at most 2.5: a hue range of 0.2 s <= 0.5) ...
    jitter_strength: float = setting(1.0, at_least=0, at_most=2.5)
    # ... and the Gaussian blur's sigma range [0.1 s, 2 s].
    blur_strength: float = setting(1.0, at_least=0)
    # Probabilities of the colour jitter, the grayscale and the blur.
    jitter_prob: float = setting(0.8, at_least=0, at_most=1)
    grayscale_prob: float = setting(0.2, at_least=0, at_most=1)
    blur_prob: float = setting(0.5, at_least=0, at_most=1)
    # Redraws of a crop that breaks the overlap rule before the overlapping-by-construction fallback box (the
    # original redraws without limit).
    max_resample_tries: int = setting(100, at_least=0)
    # Colour jitter, grayscale and blur in the train step ("device") or with PIL in the workers ("host").
    augment_on: str = setting("device", choices=AUGMENT_ON)
    # The device ops' rounding: PIL's uint8 between ops ("pil", the original's) or float throughout ("tensor").
    augment_numerics: str = setting("pil", choices=AUGMENT_NUMERICS)

    def __post_init__(self):
        check(self)
        n = len(self.size_crops)
        if not 1 <= n <= 2 or not (
            len(self.nmb_samples) == len(self.min_scale_crops) == len(self.max_scale_crops) == n
        ):
            raise ConfigError(
                "config.data.size_crops, nmb_samples, min_scale_crops and max_scale_crops must have the same "
                f"length, 1 (globals only) or 2 (globals, locals); got {self.size_crops}, {self.nmb_samples}, "
                f"{self.min_scale_crops}, {self.max_scale_crops}"
            )
        if self.nmb_samples[0] < 1:
            raise ConfigError(f"config.data.nmb_samples={self.nmb_samples} must start with >= 1 global crop")
        for lo, hi in zip(self.min_scale_crops, self.max_scale_crops):
            if lo > hi:
                raise ConfigError(f"config.data crop scale range ({lo}, {hi}) must satisfy min <= max")

    @property
    def num_global(self) -> int:
        return self.nmb_samples[0]

    def crop_group(self, i: int) -> int:
        """0 for the global crops (indices < num_global), 1 for the local ones."""
        return 0 if i < self.num_global else 1


def random_resized_crop_params(rng, width: int, height: int, scale, ratio) -> tuple[int, int, int, int]:
    """torchvision `RandomResizedCrop.get_params`: (top, left, h, w) in integer pixels of the original image.

    `rng` needs `uniform(a, b)` and `integers(lo, hi)` (a NumPy Generator), drawn in torchvision's order.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height  # central-crop fallback, as torchvision
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def intersection_areas(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Integer overlap areas of one x1,y1,x2,y2 box with each row of `others`."""
    w = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    h = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    return w * h


def _fallback_box(i: int, boxes: np.ndarray, num_global: int) -> np.ndarray:
    if i < num_global:
        return boxes[0].copy()
    g = boxes[:num_global]
    return np.array([g[:, 0].max(), g[:, 1].max(), g[:, 2].min(), g[:, 3].min()], np.int64)


def sample_crop_boxes(rng, width: int, height: int, cfg: ViewSettings) -> np.ndarray:
    """(V, 4) int64 crop boxes x1,y1,x2,y2 (globals first) obeying the original's overlap rule.

    Crop i > 0 must overlap every earlier global crop by strictly more than int(W*H*min_intersection_crops) pixels,
    twice that when crop i is itself global; local crops are never compared with each other.
    """
    num_global = cfg.num_global
    boxes = np.zeros((sum(cfg.nmb_samples), 4), np.int64)
    threshold = int(width * height * cfg.min_intersection_crops)
    for i in range(len(boxes)):
        group = cfg.crop_group(i)
        scale = (cfg.min_scale_crops[group], cfg.max_scale_crops[group])

        def draw(scale=scale):
            top, left, h, w = random_resized_crop_params(rng, width, height, scale, CROP_RATIO)
            return np.array([left, top, left + w, top + h], np.int64)

        box = draw()
        if i > 0:
            earlier = boxes[: min(i, num_global)]
            need = 2 * threshold if i < num_global else threshold
            tries = 0
            while not np.all(intersection_areas(box, earlier) > need):
                if tries == cfg.max_resample_tries:
                    box = _fallback_box(i, boxes, num_global)
                    break
                box = draw()
                tries += 1
        boxes[i] = box
    return boxes


def crop_pair_boxes(boxes: np.ndarray, cfg: ViewSettings) -> tuple[np.ndarray, np.ndarray]:
    """The original `calculate_bboxes`, in float32: overlap of each (global g, crop v) pair in resized pixels.

    Returns `gc` (G, V, 4): the overlap in crop g's resized frame, and `all` (V, G, 4): the same overlap in
    crop v's resized frame; x1,y1,x2,y2 with x along the width; mapping size * (p - crop_x1y1) / crop_wh.
    """
    g = cfg.num_global
    b = boxes.astype(np.float32)
    left_top = np.maximum(b[:g, None, :2], b[None, :, :2])  # (G, V, 2)
    right_bottom = np.minimum(b[:g, None, 2:], b[None, :, 2:])
    if not np.all(right_bottom - left_top > 0):
        raise RuntimeError(f"crop boxes without overlap reached calculate_bboxes: {boxes.tolist()}")
    wh = (b[:, 2:] - b[:, :2])[:, None, :]  # (V, 1, 2)
    sizes = np.array([cfg.size_crops[cfg.crop_group(i)] for i in range(len(b))], np.float32)[:, None, None]
    x1y1 = b[:, None, :2]
    gc = np.concatenate(
        [sizes[:g] * ((left_top - x1y1[:g]) / wh[:g]), sizes[:g] * ((right_bottom - x1y1[:g]) / wh[:g])], axis=-1
    )
    lt_v, rb_v = left_top.transpose(1, 0, 2), right_bottom.transpose(1, 0, 2)  # (V, G, 2)
    all_ = np.concatenate([sizes * ((lt_v - x1y1) / wh), sizes * ((rb_v - x1y1) / wh)], axis=-1)
    return gc.astype(np.float32), all_.astype(np.float32)


def resized_crop(img: Image.Image, box, size: int) -> Image.Image:
    """torchvision `F.resized_crop` on PIL: crop the integer box, then PIL bilinear resize to size x size."""
    return img.crop(tuple(int(v) for v in box)).resize((size, size), Image.BILINEAR)


def adjust_hue(img: Image.Image, hue_factor: float) -> Image.Image:
    """torchvision's PIL hue shift: rotate the uint8 HSV hue channel by int(hue_factor * 255), wrapping."""
    h, s, v = img.convert("HSV").split()
    np_h = np.array(h, dtype=np.uint8)
    np_h += np.int32(hue_factor * 255).astype(np.uint8)
    return Image.merge("HSV", (Image.fromarray(np_h, "L"), s, v)).convert(img.mode)


def draw_colour_params(rng, cfg: ViewSettings) -> np.ndarray:
    """One crop's colour parameters (COLOUR_PARAMS, float64), drawn as torchvision's RandomApply(ColorJitter(
    0.8 s, 0.8 s, 0.8 s, 0.2 s), p) -> RandomGrayscale(p) -> RandomApply(GaussianBlur(U(0.1 s, 2 s)), p) draw."""
    params = NO_COLOUR.copy()
    if rng.random() < cfg.jitter_prob and cfg.jitter_strength > 0:  # torchvision drops an identity jitter
        s = cfg.jitter_strength
        params[COL["jitter"]] = 1
        params[COL["order_0"] : COL["order_3"] + 1] = rng.permutation(4)
        lo = max(0.0, 1.0 - 0.8 * s)
        factors = [rng.uniform(lo, 1.0 + 0.8 * s) for _ in range(3)] + [rng.uniform(-0.2 * s, 0.2 * s)]
        params[COL["brightness"] : COL["hue"] + 1] = factors
    if rng.random() < cfg.grayscale_prob:
        params[COL["grayscale"]] = 1
    if rng.random() < cfg.blur_prob:
        params[COL["blur_sigma"]] = rng.uniform(0.1 * cfg.blur_strength, 2.0 * cfg.blur_strength)
    return params


def apply_colour_pil(img: Image.Image, params: np.ndarray) -> Image.Image:
    """torchvision's PIL ops with drawn parameters: jitter (ops in the drawn order), grayscale, PIL blur."""
    if params[COL["jitter"]]:
        ops = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
        factors = params[COL["brightness"] : COL["hue"] + 1]
        for k in params[COL["order_0"] : COL["order_3"] + 1].astype(int):
            img = adjust_hue(img, float(factors[3])) if k == 3 else ops[k](img).enhance(float(factors[k]))
    if params[COL["grayscale"]]:
        img = img.convert("L").convert("RGB")
    if params[COL["blur_sigma"]] > 0:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(params[COL["blur_sigma"]])))
    return img


def color_augment(img: Image.Image, rng, cfg: ViewSettings) -> Image.Image:
    """The original's colour pipeline on PIL: draw the parameters, then apply them."""
    return apply_colour_pil(img, draw_colour_params(rng, cfg))


def normalize(img: Image.Image | np.ndarray) -> np.ndarray:
    """ToTensor + Normalize(ImageNet) in float32 with torchvision's operation order, channels last.

    Takes a PIL image or uint8 pixels of any leading shape (..., 3), e.g. a batch of evaluation images.
    """
    x = np.array(img, dtype=np.float32)  # in-place from here: same float32 ops, fewer temporaries
    x /= np.float32(255)
    x -= IMAGENET_MEAN
    x /= IMAGENET_STD
    return x


def view_shapes(cfg: ViewSettings) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of every array `make_views` returns for one image under `cfg`, without an image: what a
    step is compiled for before any data is read (the trainer's memory check, `neco_jax.plan`)."""
    n_global, n_local = cfg.nmb_samples[0], sum(cfg.nmb_samples[1:])
    views = n_global + n_local
    s_global = cfg.size_crops[0]
    s_local = cfg.size_crops[1] if len(cfg.size_crops) > 1 else s_global
    crop = np.dtype(np.float32 if cfg.augment_on == "host" else np.uint8)
    box = np.dtype(np.float32)
    out = {
        "global_crops": ((n_global, s_global, s_global, 3), crop),
        "local_crops": ((n_local, s_local, s_local, 3), crop),
        "boxes_gc": ((n_global, views, 4), box),
        "boxes_all": ((views, n_global, 4), box),
    }
    if cfg.augment_on != "host":
        out["global_colour"] = ((n_global, len(COLOUR_PARAMS)), box)
        out["local_colour"] = ((n_local, len(COLOUR_PARAMS)), box)
    return out


def make_views(img: Image.Image, rng, cfg: ViewSettings) -> dict[str, np.ndarray]:
    """All crops of one RGB image plus their pair boxes; crops grouped by size as the batch contract wants.

    augment_on="device": uint8 crops and float32 `global_colour` / `local_colour` (crops x COLOUR_PARAMS) for
    `input_pipeline.augment.apply_batch`; "host": float32 ImageNet-normalised crops, colour already applied.
    """
    boxes = sample_crop_boxes(rng, img.width, img.height, cfg)
    on_host = cfg.augment_on == "host"
    crops, params = [[], []], [[], []]
    for i, box in enumerate(boxes):
        group = cfg.crop_group(i)
        view = resized_crop(img, box, cfg.size_crops[group])
        p = draw_colour_params(rng, cfg)
        crops[group].append(normalize(apply_colour_pil(view, p)) if on_host else np.asarray(view))
        params[group].append(p)
    gc, all_ = crop_pair_boxes(boxes, cfg)
    local_size = cfg.size_crops[1] if len(cfg.size_crops) > 1 else cfg.size_crops[0]
    dtype = np.float32 if on_host else np.uint8
    out = {
        "global_crops": np.stack(crops[0]),
        "local_crops": np.stack(crops[1]) if crops[1] else np.zeros((0, local_size, local_size, 3), dtype),
        "boxes_gc": gc,
        "boxes_all": all_,
    }
    if not on_host:
        for name, group in (("global_colour", params[0]), ("local_colour", params[1])):
            out[name] = np.array(group, np.float32).reshape(len(group), len(COLOUR_PARAMS))
    return out
