"""NeCo's colour augmentation on the accelerator: the parameters drawn by the workers, applied in the train step.

`apply_batch` turns the loader's uint8 crops and their colour parameters (input_pipeline.views.COLOUR_PARAMS)
into float32 ImageNet-normalised crops, vectorised over all crops of the batch (`jax.vmap`, no branch per
crop). Each crop's four jitter ops run in its drawn order, then grayscale, then blur. Two numerics
(data.augment_numerics):

"pil" (default): the numbers of the original, which runs torchvision's transforms on PIL images. The ops work
on uint8 levels and round as Pillow's C code does (src/libImaging in python-pillow/Pillow): brightness,
contrast and saturation are `ImageEnhance` blends (Blend.c: float32, truncated to uint8) with a black image,
the rounded mean of the `convert("L")` image, and the `convert("L")` image (Convert.c: ITU-R 601-2 in 16-bit
fixed point, rounded); torchvision's PIL hue shift goes through `convert("HSV")` (uint8 hue, saturation and
value) and back; the blur is `ImageFilter.GaussianBlur`: three extended-box passes per axis in 24-bit fixed
point, each rounded to uint8, edge pixels repeated (BoxBlur.c). On the CPU equal to Pillow level for level,
except for about one value in 10^4 of the hue shift, where Pillow rounds in double precision
(tests/test_augment.py); a GPU compiler that fuses a multiply and an add rounds once instead of twice, which
can move a value that lands on a level boundary by one level.

"tensor": torchvision's functional ops on float tensors (torchvision/transforms/_functional_tensor.py):
brightness, contrast (blend with the grayscale mean) and saturation (blend with the grayscale image) as
`_blend` with a clamp to [0, 1]; hue through `_rgb2hsv` / `_hsv2rgb` with the hue wrapped modulo 1; grayscale
with the ITU-R 601-2 weights 0.2989, 0.587, 0.114. The blur is torchvision's sampled Gaussian (exp(-x^2 / 2
sigma^2) at integer offsets, normalised) with PIL's edge handling (edge pixels repeated, where torchvision
reflects), applied separably over `blur_radius` pixels each side (ceil(3 * the largest sigma)). This chain
differs from PIL's by about 1.3 grey levels on average, most of it the half level PIL's truncation loses per
blend.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from input_pipeline.views import COL, IMAGENET_MEAN, IMAGENET_STD, ViewSettings

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
CROP_KEYS = (("global_crops", "global_colour"), ("local_crops", "local_colour"))
JITTER_BLENDS = ("brightness", "contrast", "saturation")  # jitter ops 0-2 (3 is the hue shift): `jitter_blend`


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


# ---- PIL numerics: the original's ops on PIL images, on uint8 levels held as float32 integers 0..255.


def pil_blend(degenerate, x: jax.Array, factor) -> jax.Array:
    """`Image.blend(degenerate, x, factor)` (libImaging/Blend.c): degenerate + factor * (x - degenerate) in
    float32, clamped to [0, 255] and truncated to uint8 -- the ImageEnhance ops' rounding."""
    return jnp.floor(jnp.clip(degenerate + factor * (x - degenerate), 0.0, 255.0))


def pil_luma(x: jax.Array) -> jax.Array:
    """(..., 3) levels -> (..., 1): `convert("L")`, ITU-R 601-2 in 16-bit fixed point with rounding
    (libImaging/Convert.c, L24)."""
    xi = x.astype(jnp.int32)
    luma = (xi[..., 0] * 19595 + xi[..., 1] * 38470 + xi[..., 2] * 7471 + 0x8000) >> 16
    return luma[..., None].astype(jnp.float32)


def pil_mean_level(gray: jax.Array) -> jax.Array:
    """`int(ImageStat.Stat(gray).mean[0] + 0.5)` of one L image, exactly, in integers."""
    n = gray.size
    return ((2 * jnp.sum(gray.astype(jnp.int32)) + n) // (2 * n)).astype(jnp.float32)


def _exact_divide(x: jax.Array, divisor: float) -> jax.Array:
    """x / divisor correctly rounded, as PIL's C computes it. XLA divides by a constant or by a broadcast
    scalar by multiplying with the rounded reciprocal (x / 6 != x * (1 / 6) for some x); a full-shape divisor
    behind an optimization barrier stays a division."""
    return x / jax.lax.optimization_barrier(jnp.full(x.shape, divisor, x.dtype))


def _floor_times_255(s: jax.Array) -> jax.Array:
    """floor(s * 255) of the exact product of a float32 s >= 0 (PIL's C multiplies a float by the double
    255.0): s * 256 is exact, so whether the rounded s * 256 - s reached an integer from below is known."""
    p = s * 256.0 - s
    fp = jnp.floor(p)
    return fp - ((p == fp) & (s * 256.0 - p < s))


def pil_rgb_to_hsv(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`convert("HSV")` (libImaging/Convert.c, rgb2hsv_row): uint8 hue (a turn = 256), saturation, value."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    maxc, minc = jnp.max(x, axis=-1), jnp.min(x, axis=-1)
    first_max = jnp.argmax(x, axis=-1)  # PIL's sector order r, g, b (see `rgb_to_hsv`)
    eqc = maxc == minc
    cr = jnp.where(eqc, 1.0, maxc - minc)
    s = cr / jnp.where(eqc, 1.0, maxc)
    rc, gc, bc = (maxc - r) / cr, (maxc - g) / cr, (maxc - b) / cr
    # h = base + add - sub, summed exactly and rounded once to float32 as PIL's C does (in double). One of
    # add, sub is the minimum channel's, exactly 1: that term joins the integer base first.
    base = 2.0 * first_max.astype(jnp.float32)
    add = jnp.where(first_max == 0, bc, jnp.where(first_max == 1, rc, gc))
    sub = jnp.where(first_max == 0, gc, jnp.where(first_max == 1, bc, rc))
    h = jnp.where(add == 1.0, (base + 1.0) - sub, (base - sub) + add)
    h = _exact_divide(h, 6.0)
    h = jnp.where(h < 0, h + 1.0, h)  # PIL: fmod(h / 6 + 1, 1), stored as a float
    return jnp.where(eqc, 0.0, _floor_times_255(h)), jnp.where(eqc, 0.0, _floor_times_255(s)), maxc


def pil_hsv_to_rgb(h: jax.Array, s: jax.Array, v: jax.Array) -> jax.Array:
    """`Image.merge("HSV", ...).convert("RGB")` (libImaging/Convert.c, hsv2rgb): sector floor(6 h / 255),
    p, q, t rounded half up."""
    i = (h.astype(jnp.int32) * 6) // 255
    f = _exact_divide(h * 6.0 - (i * 255).astype(jnp.float32), 255.0)
    fs = _exact_divide(s, 255.0)
    p = jnp.floor(v * (1.0 - fs) + 0.5)
    q = jnp.floor(v * (1.0 - fs * f) + 0.5)
    t = jnp.floor(v * (1.0 - fs * (1.0 - f)) + 0.5)
    sectors = jnp.stack(
        [
            jnp.stack([v, q, p, p, t, v], axis=-1),
            jnp.stack([t, v, v, q, p, p], axis=-1),
            jnp.stack([p, p, t, v, v, q], axis=-1),
        ],
        axis=-2,
    )
    rgb = jnp.take_along_axis(sectors, jnp.broadcast_to((i % 6)[..., None, None], i.shape + (3, 1)), axis=-1)[..., 0]
    return jnp.where((s == 0)[..., None], v[..., None], jnp.clip(rgb, 0.0, 255.0))


def pil_adjust_hue(x: jax.Array, factor) -> jax.Array:
    """torchvision's hue shift on PIL images: the uint8 HSV hue plus int(factor * 255), wrapping mod 256."""
    h, s, v = pil_rgb_to_hsv(x)
    h = jnp.mod(h + jnp.trunc(factor * 255.0), 256.0)
    return pil_hsv_to_rgb(h, s, v)


def pil_box_radius(sigma):
    """PIL's `_gaussian_blur_radius` (libImaging/BoxBlur.c) for 3 passes: the extended box radius whose three
    passes have variance sigma^2 (Gwosdek et al., SSVM 2011). Works on floats and float32 arrays."""
    if isinstance(sigma, float):
        sqrt, floor, sigma2 = math.sqrt, math.floor, sigma * sigma / 3.0
    else:
        sqrt, floor, sigma2 = jnp.sqrt, jnp.floor, _exact_divide(sigma * sigma, 3.0)
    length = sqrt(12.0 * sigma2 + 1.0)
    l = floor((length - 1.0) / 2.0)  # noqa: E741
    a = (2 * l + 1) * (l * (l + 1) - 3 * sigma2) / (6 * (sigma2 - (l + 1) * (l + 1)))
    return l + a


def pil_box_taps(blur_strength: float) -> int:
    """Half-width of the box kernel for box radii up to that of sigma = 2 * blur_strength (the largest drawn)."""
    return int(pil_box_radius(2.0 * blur_strength)) + 1


def pil_gaussian_blur(x: jax.Array, sigma, taps: int) -> jax.Array:
    """`ImageFilter.GaussianBlur(sigma)` of one (H, W, C) image of levels (libImaging/BoxBlur.c): three
    extended-box passes along the rows, then three along the columns, each in 24-bit fixed point (weight ww
    inside the box, fw at its two ends) rounded to uint8, edge pixels repeated outwards."""
    radius = pil_box_radius(sigma)
    r = jnp.floor(radius).astype(jnp.int32)
    ww = jnp.floor(float(1 << 24) / (radius * 2.0 + 1.0)).astype(jnp.uint32)
    fw = (jnp.uint32(1 << 24) - (2 * r + 1).astype(jnp.uint32) * ww) // 2
    offsets = jnp.abs(jnp.arange(-taps, taps + 1))
    kernel = jnp.where(offsets <= r, ww, jnp.where(offsets == r + 1, fw, jnp.uint32(0)))

    def one_pass(x, axis):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (taps, taps)
        xp = jnp.pad(x, pad, mode="edge")
        n = x.shape[axis]
        acc = sum(kernel[t] * jax.lax.slice_in_dim(xp, t, t + n, axis=axis) for t in range(2 * taps + 1))
        return (acc + jnp.uint32(1 << 23)) >> 24

    # Passes in a loop: its carry is stored between passes; fused, each pass would recompute the last per tap.
    x = jax.lax.fori_loop(0, 3, lambda _, x: one_pass(x, 1), x.astype(jnp.uint32))
    return jax.lax.fori_loop(0, 3, lambda _, x: one_pass(x, 0), x).astype(jnp.float32)


def jitter_blend(x: jax.Array, op: jax.Array, factor, pil: bool) -> jax.Array:
    """Jitter op `op` of one (H, W, 3) image, an index into JITTER_BLENDS (torchvision's ColorJitter order): a
    blend with black, the mean grey level or the grey image. `op` may be traced: the train step picks it per crop
    from the drawn order. `pil`: Pillow's `ImageEnhance` numerics on uint8 levels, else torchvision's
    `adjust_brightness` / `adjust_contrast` / `adjust_saturation` on [0, 1] floats."""
    gray = pil_luma(x) if pil else grayscale(x)
    mean = pil_mean_level(gray) if pil else jnp.mean(gray)
    target = jnp.where(op == 1, mean, jnp.where(op == 2, gray, 0.0))
    return pil_blend(target, x, factor) if pil else blend(x, target, factor)


def _jitter(x: jax.Array, params: jax.Array, pil: bool) -> jax.Array:
    """The jitter's four ops in the drawn order. Brightness, contrast and saturation are `jitter_blend`; the hue
    shift, the costly op, runs once: blends before it, hue, blends after it (a blend with factor 1 is the
    identity, so the loops run all four positions and leave the others unchanged)."""
    order = params[COL["order_0"] : COL["order_3"] + 1].astype(jnp.int32)
    factors = params[COL["brightness"] : COL["hue"] + 1]
    hue_at = jnp.argmax(order == 3)

    def blends(x, active):
        def one(pos, x):
            k = order[pos]
            factor = jnp.where(active(pos) & (k != 3), factors[jnp.minimum(k, 2)], 1.0)
            return jitter_blend(x, k, factor, pil)

        # a loop, not unrolled: XLA would fuse the blends and recompute each one per channel of the next
        return jax.lax.fori_loop(0, 4, one, x)

    x = blends(x, lambda pos: pos < hue_at)
    x = (pil_adjust_hue if pil else adjust_hue)(x, factors[3])
    return blends(x, lambda pos: pos > hue_at)


def colour_crop(crop: jax.Array, params: jax.Array, blur_strength: float, numerics: str) -> jax.Array:
    """One uint8 (H, W, 3) crop and its COLOUR_PARAMS -> float32 in [0, 1]: jitter, grayscale, blur.

    numerics "pil": PIL's ops on uint8 levels (the original's numbers); "tensor": torchvision's float ops and
    a sampled Gaussian."""
    pil = numerics == "pil"
    x = crop.astype(jnp.float32) if pil else crop.astype(jnp.float32) / 255.0
    x = jnp.where(params[COL["jitter"]] > 0, _jitter(x, params, pil), x)
    x = jnp.where(params[COL["grayscale"]] > 0, jnp.broadcast_to((pil_luma if pil else grayscale)(x), x.shape), x)
    sigma = params[COL["blur_sigma"]]
    safe = jnp.where(sigma > 0, sigma, 1.0)
    if pil:
        x = jnp.where(sigma > 0, pil_gaussian_blur(x, safe, pil_box_taps(blur_strength)), x)
        return x / 255.0
    return jnp.where(sigma > 0, gaussian_blur(x, safe, blur_radius(blur_strength)), x)


def normalize(x: jax.Array) -> jax.Array:
    """torchvision Normalize with the ImageNet statistics (as the host path's `views.normalize`)."""
    return (x - IMAGENET_MEAN) / IMAGENET_STD


def apply_batch(batch: dict, views: ViewSettings = ViewSettings()) -> dict:
    """The loader's batch with uint8 crops -> the same batch with float32 normalised crops, colour applied.

    Crops that are already float (data.augment_on="host") pass through; the colour keys are dropped. `views`
    gives the blur kernel's width (`blur_strength`) and the numerics (`augment_numerics`, see the module
    docstring). Jittable.
    """
    blur_strength, numerics = views.blur_strength, views.augment_numerics
    out = {k: v for k, v in batch.items() if k not in dict(CROP_KEYS).values()}
    for crops_key, params_key in CROP_KEYS:
        crops = batch.get(crops_key)
        if crops is None or crops.dtype != jnp.uint8:
            continue
        lead = crops.shape[:-3]
        flat = crops.reshape((-1,) + crops.shape[-3:])
        params = batch[params_key].reshape(-1, batch[params_key].shape[-1])
        colour = jax.vmap(colour_crop, in_axes=(0, 0, None, None))(flat, params, blur_strength, numerics)
        out[crops_key] = normalize(colour).reshape(lead + crops.shape[-3:])
    return out
