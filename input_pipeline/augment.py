"""NeCo's colour augmentation on the accelerator: the parameters drawn by the workers, applied in the train step.

`apply_batch` turns the loader's uint8 crops and their colour parameters (input_pipeline.views.COLOUR_PARAMS)
into float32 ImageNet-normalised crops, vectorised over all crops of the batch (`jax.vmap`, no branch per
crop). The ops follow torchvision's functional ops on float tensors (torchvision/transforms/_functional_tensor.py):
brightness, contrast (blend with the grayscale mean) and saturation (blend with the grayscale image) as
`_blend` with a clamp to [0, 1]; hue through `_rgb2hsv` / `_hsv2rgb` with the hue wrapped modulo 1; grayscale
with the ITU-R 601-2 weights 0.2989, 0.587, 0.114. Each crop's four jitter ops run in its drawn order.

Blur: the original blurs with PIL's `ImageFilter.GaussianBlur(radius=sigma)`, which approximates a Gaussian of
standard deviation sigma by three box blurs and extends the edge pixels outwards. torchvision's tensor
`gaussian_blur` convolves with a sampled Gaussian but pads by reflection. We take the sampled Gaussian
(torchvision's kernel: exp(-x^2 / 2 sigma^2) at integer offsets, normalised) and PIL's edge handling (edge
pixels repeated), applied separably; the kernel reaches `blur_radius` pixels each side, by default
ceil(3 * the largest sigma), about where PIL's three box blurs end. Only the jitter, grayscale and blur are
random; the result equals PIL's chain up to PIL's rounding to uint8 between ops (tests/test_augment.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from input_pipeline.views import COL, IMAGENET_MEAN, IMAGENET_STD

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
CROP_KEYS = (("global_crops", "global_colour"), ("local_crops", "local_colour"))


def blur_radius(blur_strength: float) -> int:
    """Kernel half-width for sigmas up to 2 * blur_strength (the largest the workers draw)."""
    return max(1, math.ceil(3 * 2.0 * blur_strength))


def grayscale(x: jax.Array) -> jax.Array:
    """(..., 3) -> (..., 1) luma, torchvision's `rgb_to_grayscale` weights."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b)[..., None]


def blend(x: jax.Array, other: jax.Array, factor) -> jax.Array:
    """torchvision `_blend`: factor * x + (1 - factor) * other, clamped to [0, 1]."""
    return jnp.clip(factor * x + (1.0 - factor) * other, 0.0, 1.0)


def adjust_brightness(x, factor):
    return blend(x, jnp.zeros_like(x), factor)


def adjust_contrast(x, factor):
    return blend(x, jnp.mean(grayscale(x), axis=(-3, -2, -1), keepdims=True), factor)


def adjust_saturation(x, factor):
    return blend(x, grayscale(x), factor)


def rgb_to_hsv(x: jax.Array) -> jax.Array:
    """(..., 3) RGB in [0, 1] -> HSV with hue in [0, 1), as torchvision's `_rgb2hsv`.

    The hue's sector is the first maximal channel (torchvision's tie order r, g, b) taken by `argmax`, not
    by `maxc == r` tests: under jit XLA may recompute `x` in several fusions that round differently, and an
    equality test between two such copies can then pick no sector or a wrong one.
    """
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    maxc, minc = jnp.max(x, axis=-1), jnp.min(x, axis=-1)
    first_max = jnp.argmax(x, axis=-1)
    eqc = maxc == minc
    cr = maxc - minc
    s = cr / jnp.where(eqc, 1.0, maxc)
    cr_div = jnp.where(eqc, 1.0, cr)
    rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
    h = jnp.where(first_max == 0, bc - gc, jnp.where(first_max == 1, 2.0 + rc - bc, 4.0 + gc - rc))
    h = jnp.mod(h / 6.0 + 1.0, 1.0)
    return jnp.stack([h, s, maxc], axis=-1)


def hsv_to_rgb(x: jax.Array) -> jax.Array:
    """Inverse of `rgb_to_hsv`, as torchvision's `_hsv2rgb` (sector by floor(6 h), clamped p, q, t)."""
    h, s, v = x[..., 0], x[..., 1], x[..., 2]
    i = jnp.floor(h * 6.0)
    f = h * 6.0 - i
    i = jnp.mod(i.astype(jnp.int32), 6)
    p = jnp.clip(v * (1.0 - s), 0.0, 1.0)
    q = jnp.clip(v * (1.0 - s * f), 0.0, 1.0)
    t = jnp.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
    sectors = jnp.stack(
        [
            jnp.stack([v, q, p, p, t, v], axis=-1),
            jnp.stack([t, v, v, q, p, p], axis=-1),
            jnp.stack([p, p, t, v, v, q], axis=-1),
        ],
        axis=-2,
    )  # (..., 3 channels, 6 sectors)
    return jnp.take_along_axis(sectors, jnp.broadcast_to(i[..., None, None], i.shape + (3, 1)), axis=-1)[..., 0]


def adjust_hue(x, factor):
    hsv = rgb_to_hsv(x)
    return hsv_to_rgb(hsv.at[..., 0].set(jnp.mod(hsv[..., 0] + factor, 1.0)))


def gaussian_kernel(sigma, radius: int) -> jax.Array:
    """torchvision's sampled Gaussian, exp(-x^2 / 2 sigma^2) at x = -radius..radius, normalised."""
    x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    pdf = jnp.exp(-0.5 * (x / sigma) ** 2)
    return pdf / jnp.sum(pdf)


def gaussian_blur(x: jax.Array, sigma, radius: int) -> jax.Array:
    """Separable Gaussian blur of one (H, W, C) image, edge pixels repeated outwards (PIL's edge handling)."""
    k = gaussian_kernel(sigma, radius)
    h, w = x.shape[0], x.shape[1]
    xp = jnp.pad(x, ((0, 0), (radius, radius), (0, 0)), mode="edge")
    x = sum(k[t] * xp[:, t : t + w] for t in range(2 * radius + 1))
    xp = jnp.pad(x, ((radius, radius), (0, 0), (0, 0)), mode="edge")
    return sum(k[t] * xp[t : t + h] for t in range(2 * radius + 1))


def _jitter(x: jax.Array, params: jax.Array) -> jax.Array:
    """The jitter's four ops in the drawn order. Brightness, contrast and saturation are one blend with
    different targets; the hue shift, the costly op, runs once: blends before it, hue, blends after it."""
    order = params[COL["order_0"] : COL["order_3"] + 1].astype(jnp.int32)
    factors = params[COL["brightness"] : COL["hue"] + 1]
    hue_at = jnp.argmax(order == 3)

    def blends(x, active):
        for pos in range(4):
            k = order[pos]
            gray = grayscale(x)
            target = jnp.where(k == 1, jnp.mean(gray), jnp.where(k == 2, gray, 0.0))
            x = blend(x, target, jnp.where(active(pos) & (k != 3), factors[jnp.minimum(k, 2)], 1.0))
        return x

    x = blends(x, lambda pos: pos < hue_at)
    x = adjust_hue(x, factors[3])
    return blends(x, lambda pos: pos > hue_at)


def colour_crop(crop: jax.Array, params: jax.Array, radius: int) -> jax.Array:
    """One uint8 (H, W, 3) crop and its COLOUR_PARAMS -> float32 in [0, 1]: jitter, grayscale, blur."""
    x = crop.astype(jnp.float32) / 255.0
    x = jnp.where(params[COL["jitter"]] > 0, _jitter(x, params), x)
    x = jnp.where(params[COL["grayscale"]] > 0, jnp.broadcast_to(grayscale(x), x.shape), x)
    sigma = params[COL["blur_sigma"]]
    return jnp.where(sigma > 0, gaussian_blur(x, jnp.where(sigma > 0, sigma, 1.0), radius), x)


def normalize(x: jax.Array) -> jax.Array:
    """torchvision Normalize with the ImageNet statistics (as the host path's `views.normalize`)."""
    return (x - IMAGENET_MEAN) / IMAGENET_STD


def apply_batch(batch: dict, *, radius: int = blur_radius(1.0)) -> dict:
    """The loader's batch with uint8 crops -> the same batch with float32 normalised crops, colour applied.

    Crops that are already float (data.augment_on="host") pass through; the colour keys are dropped.
    `radius`: the blur kernel's half-width, `blur_radius(data.blur_strength)`. Jittable.
    """
    out = {k: v for k, v in batch.items() if k not in dict(CROP_KEYS).values()}
    for crops_key, params_key in CROP_KEYS:
        crops = batch.get(crops_key)
        if crops is None or crops.dtype != jnp.uint8:
            continue
        lead = crops.shape[:-3]
        flat = crops.reshape((-1,) + crops.shape[-3:])
        params = batch[params_key].reshape(-1, batch[params_key].shape[-1])
        colour = jax.vmap(colour_crop, in_axes=(0, 0, None))(flat, params, radius)
        out[crops_key] = normalize(colour).reshape(lead + crops.shape[-3:])
    return out
