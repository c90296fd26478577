"""NeCo multi-crop views: torchvision parity of crop sampling and colour ops, the overlap rule, and the boxes
checked by reading coordinate-encoding pixels back through them."""

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter

from input_pipeline.errors import ConfigError
from input_pipeline.views import (
    COLOUR_PARAMS,
    ViewSettings,
    apply_colour_pil,
    color_augment,
    crop_pair_boxes,
    make_views,
    normalize,
    random_resized_crop_params,
    resized_crop,
    sample_crop_boxes,
    view_shapes,
)
from neco_jax.errors import UserError

SMALL = ViewSettings(size_crops=(56, 28))
GEOMETRY_ONLY = ViewSettings(size_crops=(56, 28), jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)


class TorchDraws:
    """Feeds our sampler torch's global RNG draws in torchvision's order, so both must give the same box."""

    def uniform(self, a, b):
        return torch.empty(1).uniform_(a, b).item()

    def integers(self, lo, hi):
        return torch.randint(lo, hi, size=(1,)).item()


@pytest.mark.parametrize("width,height", [(200, 150), (640, 427), (37, 300), (1000, 10), (5, 4)])
@pytest.mark.parametrize("scale", [(0.25, 1.0), (0.05, 0.25)])
def test_crop_params_match_torchvision(width, height, scale):
    dummy = torch.zeros(3, height, width)
    for seed in range(40):
        torch.manual_seed(seed)
        expected = T.RandomResizedCrop.get_params(dummy, list(scale), [3 / 4, 4 / 3])
        torch.manual_seed(seed)
        got = random_resized_crop_params(TorchDraws(), width, height, scale, (3 / 4, 4 / 3))
        assert got == tuple(expected), (seed, got, expected)


def _check_overlap_rule(boxes, width, height, cfg):
    g = cfg.num_global
    assert np.all(boxes[:, :2] >= 0) and np.all(boxes[:, 2] <= width) and np.all(boxes[:, 3] <= height)
    assert np.all(boxes[:, 2:] > boxes[:, :2])
    base = int(width * height * cfg.min_intersection_crops)
    for i in range(1, len(boxes)):
        need = 2 * base if i < g else base
        for j in range(min(i, g)):  # every earlier global crop, written out pair by pair
            iw = min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0])
            ih = min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1])
            assert max(iw, 0) * max(ih, 0) > need, (i, j, boxes)


@pytest.mark.parametrize("tries", [100, 0])
def test_overlap_rule_holds_on_every_pair(tries):
    cfg = ViewSettings(size_crops=(56, 28), max_resample_tries=tries)
    for seed in range(150):
        rng = np.random.default_rng(seed)
        width, height = int(rng.integers(20, 700)), int(rng.integers(20, 700))
        _check_overlap_rule(sample_crop_boxes(rng, width, height, cfg), width, height, cfg)


def test_fallback_boxes_are_documented_copies():
    cfg = ViewSettings(size_crops=(56, 28), max_resample_tries=0, min_intersection_crops=0.2)
    seen_copy = seen_intersection = False
    for seed in range(200):
        boxes = sample_crop_boxes(np.random.default_rng(seed), 300, 200, cfg)
        seen_copy |= bool(np.array_equal(boxes[1], boxes[0]))
        inter = np.r_[np.maximum(boxes[0, :2], boxes[1, :2]), np.minimum(boxes[0, 2:], boxes[1, 2:])]
        seen_intersection |= any(np.array_equal(b, inter) for b in boxes[2:])
    assert seen_copy and seen_intersection


def test_pair_boxes_match_a_loop_reference():
    for seed in range(20):
        rng = np.random.default_rng(seed)
        boxes = sample_crop_boxes(rng, 333, 251, SMALL)
        gc, all_ = crop_pair_boxes(boxes, SMALL)
        assert gc.shape == (2, 6, 4) and all_.shape == (6, 2, 4) and gc.dtype == all_.dtype == np.float32
        f = np.float32
        for g in range(2):
            for v in range(6):
                inter = [
                    max(boxes[g][0], boxes[v][0]),
                    max(boxes[g][1], boxes[v][1]),
                    min(boxes[g][2], boxes[v][2]),
                    min(boxes[g][3], boxes[v][3]),
                ]
                for frame, out in ((g, gc[g, v]), (v, all_[v, g])):
                    size = f(56 if frame < 2 else 28)
                    x1, y1, x2, y2 = (f(c) for c in boxes[frame])
                    ref = [
                        size * ((f(inter[0]) - x1) / (x2 - x1)),
                        size * ((f(inter[1]) - y1) / (y2 - y1)),
                        size * ((f(inter[2]) - x1) / (x2 - x1)),
                        size * ((f(inter[3]) - y1) / (y2 - y1)),
                    ]
                    np.testing.assert_array_equal(out, np.array(ref, np.float32))
        np.testing.assert_array_equal(gc[0, 0], [0, 0, 56, 56])


def bilinear(img: np.ndarray, x: float, y: float) -> float:
    """Sample a (H, W) array at continuous pixel coordinates (pixel k covers [k, k+1), centre k + 0.5)."""
    x, y = x - 0.5, y - 0.5
    x0, y0 = int(np.floor(x)), int(np.floor(y))
    ax, ay = x - x0, y - y0
    x0c, x1c = np.clip([x0, x0 + 1], 0, img.shape[1] - 1)
    y0c, y1c = np.clip([y0, y0 + 1], 0, img.shape[0] - 1)
    top = (1 - ax) * img[y0c, x0c] + ax * img[y0c, x1c]
    bottom = (1 - ax) * img[y1c, x0c] + ax * img[y1c, x1c]
    return float((1 - ay) * top + ay * bottom)


def _read_back_errors(boxes, crops_xy, cfg):
    """For each (g, v) pair and points inside the overlap box, the original-image coordinates read from crop g's
    and crop v's pixels, compared with the point the integer crop boxes predict."""
    gc, all_ = crop_pair_boxes(boxes, cfg)
    errors = []
    for g in range(cfg.num_global):
        for v in range(len(boxes)):
            inter = np.r_[np.maximum(boxes[g, :2], boxes[v, :2]), np.minimum(boxes[g, 2:], boxes[v, 2:])]
            for fx in (0.25, 0.5, 0.75):
                for fy in (0.25, 0.5, 0.75):
                    truth = inter[:2] + np.array([fx, fy]) * (inter[2:] - inter[:2])
                    for crop, box in ((g, gc[g, v]), (v, all_[v, g])):
                        size = cfg.size_crops[cfg.crop_group(crop)]
                        p = box[:2] + np.array([fx, fy]) * (box[2:] - box[:2])
                        # PIL's filter (1 output px, or 1 input px when upsampling) is clipped at crop edges
                        margin = np.maximum(1.0, size / (boxes[crop, 2:] - boxes[crop, :2])) + 0.5
                        if np.any(p < margin) or np.any(p > size - margin):
                            continue
                        read = [bilinear(crops_xy[crop][c], *p) + 0.5 for c in (0, 1)]
                        errors.append(np.abs(np.array(read) - truth).max())
    return np.array(errors)


def test_boxes_read_back_through_float_coordinate_images():
    width, height = 240, 180
    xs = Image.fromarray(np.tile(np.arange(width, dtype=np.float32), (height, 1)), "F")
    ys = Image.fromarray(np.tile(np.arange(height, dtype=np.float32)[:, None], (1, width)), "F")
    errors = []
    for seed in range(10):
        boxes = sample_crop_boxes(np.random.default_rng(seed), width, height, SMALL)
        crops = [
            [np.asarray(resized_crop(im, b, SMALL.size_crops[SMALL.crop_group(i)])) for im in (xs, ys)]
            for i, b in enumerate(boxes)
        ]
        errors.append(_read_back_errors(boxes, crops, SMALL))
    errors = np.concatenate(errors)
    assert len(errors) > 500
    # Far inside the half-pixel bound; the residue is PIL's discrete triangle filter, which at mild downscales
    # is not exactly linear-preserving (up to ~0.06 px), while a box off by half a crop pixel errs by >= 0.5 px.
    assert errors.max() < 0.1


def test_full_views_read_back_within_half_a_pixel():
    width, height = 240, 180
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    img = Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8), "RGB")
    errors = []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        boxes = sample_crop_boxes(np.random.default_rng(seed), width, height, GEOMETRY_ONLY)
        out = make_views(img, rng, GEOMETRY_ONLY)
        crops = list(out["global_crops"]) + list(out["local_crops"])
        pixels = [np.moveaxis(c.astype(np.float64), -1, 0) for c in crops]  # uint8 crops (augment_on="device")
        errors.append(_read_back_errors(boxes, pixels, GEOMETRY_ONLY))
        gc, all_ = crop_pair_boxes(boxes, GEOMETRY_ONLY)
        np.testing.assert_array_equal(out["boxes_gc"], gc)
        np.testing.assert_array_equal(out["boxes_all"], all_)
    errors = np.concatenate(errors)
    assert len(errors) > 300 and errors.max() <= 0.5 + 1e-3  # uint8 rounding of the crops is the only error


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


class ScriptedDraws:
    """An rng that returns scripted values, so our colour pipeline and torchvision's apply the same ops."""

    def __init__(self, randoms, order, uniforms):
        self.randoms, self.order, self.uniforms = list(randoms), order, list(uniforms)

    def random(self):
        return self.randoms.pop(0)

    def permutation(self, n):
        return np.array(self.order)

    def uniform(self, a, b):
        u = self.uniforms.pop(0)
        return a + u * (b - a)


@pytest.fixture(scope="module")
def photo():
    rng = np.random.default_rng(0)
    smooth = np.cumsum(rng.integers(-6, 7, (48, 64, 3)), axis=1) % 256
    return Image.fromarray(smooth.astype(np.uint8), "RGB")


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1)])
@pytest.mark.parametrize("gray,blur", [(False, False), (True, True)])
def test_colour_pipeline_matches_torchvision(photo, order, gray, blur):
    u = [0.9, 0.15, 0.6, 0.05, 0.7]  # brightness, contrast, saturation, hue, sigma (as fractions of range)
    rng = ScriptedDraws([0.1, 0.1 if gray else 0.9, 0.1 if blur else 0.9], order, u)
    got = color_augment(photo, rng, SMALL)
    s = 1.0
    factors = [0.2 + 1.6 * u[0], 0.2 + 1.6 * u[1], 0.2 + 1.6 * u[2], -0.2 + 0.4 * u[3]]
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    ref = photo
    for k in order:
        ref = ops[k](ref, factors[k])
    if gray:
        ref = TF.rgb_to_grayscale(ref, num_output_channels=3)
    if blur:
        ref = ref.filter(ImageFilter.GaussianBlur(radius=0.1 * s + u[4] * 1.9 * s))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


def test_resize_and_normalisation_match_torchvision(photo):
    for box, size in (((3, 5, 40, 30), 56), ((10, 0, 64, 48), 28), ((0, 0, 20, 9), 98)):
        left, top, right, bottom = box
        ref = TF.resized_crop(photo, top, left, bottom - top, right - left, [size, size], T.InterpolationMode.BILINEAR)
        got = resized_crop(photo, box, size)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
        ref_t = T.Normalize(IMAGENET_MEAN.tolist(), IMAGENET_STD.tolist())(TF.to_tensor(ref))
        np.testing.assert_array_equal(normalize(got), ref_t.permute(1, 2, 0).numpy())


def test_make_views_shapes_and_randomness(photo):
    out = make_views(photo, np.random.default_rng(1), SMALL)
    assert out["global_crops"].shape == (2, 56, 56, 3) and out["local_crops"].shape == (4, 28, 28, 3)
    assert out["global_crops"].dtype == out["local_crops"].dtype == np.uint8
    n = len(COLOUR_PARAMS)
    assert out["global_colour"].shape == (2, n) and out["local_colour"].shape == (4, n)
    assert out["boxes_gc"].shape == (2, 6, 4) and out["boxes_all"].shape == (6, 2, 4)
    assert all(out[k].dtype == np.float32 for k in ("global_colour", "local_colour", "boxes_gc", "boxes_all"))
    again = make_views(photo, np.random.default_rng(1), SMALL)
    other = make_views(photo, np.random.default_rng(2), SMALL)
    for k in out:
        np.testing.assert_array_equal(out[k], again[k])
    assert not np.array_equal(out["global_crops"], other["global_crops"])


def test_host_mode_applies_the_same_draws(photo):
    """augment_on="host" draws what "device" draws, and applies it with the PIL ops: crop by crop, the host
    crops are the device mode's uint8 crops put through `apply_colour_pil` with its parameters."""
    host_cfg = ViewSettings(size_crops=(56, 28), augment_on="host")
    for seed in range(4):
        device = make_views(photo, np.random.default_rng(seed), SMALL)
        host = make_views(photo, np.random.default_rng(seed), host_cfg)
        assert set(host) == {"global_crops", "local_crops", "boxes_gc", "boxes_all"}
        for group in ("global", "local"):
            want = [
                normalize(apply_colour_pil(Image.fromarray(c), p.astype(np.float64)))
                for c, p in zip(device[f"{group}_crops"], device[f"{group}_colour"])
            ]
            assert host[f"{group}_crops"].dtype == np.float32
            np.testing.assert_allclose(host[f"{group}_crops"], np.stack(want), atol=1e-6, rtol=0)
        np.testing.assert_array_equal(host["boxes_gc"], device["boxes_gc"])


@pytest.mark.parametrize("augment_on", ["device", "host"])
def test_view_shapes_are_what_make_views_returns(photo, augment_on):
    """The shapes a step is compiled for before any image is read (the trainer's memory check, the planner)."""
    cfg = ViewSettings(size_crops=(56, 28), nmb_samples=(2, 3), augment_on=augment_on)
    out = make_views(photo, np.random.default_rng(0), cfg)
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == view_shapes(cfg)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(size_crops=(56,)),
        dict(min_scale_crops=(0.5, 0.05), max_scale_crops=(0.4, 0.25)),
        dict(min_intersection_crops=1.0),
        dict(grayscale_prob=1.5),
        dict(nmb_samples=(0, 4)),
        dict(augment_on="gpu"),
    ],
)
def test_bad_view_settings_are_user_errors(kwargs):
    with pytest.raises(ConfigError) as info:
        ViewSettings(**kwargs)
    assert isinstance(info.value, UserError)
