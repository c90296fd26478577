"""ROI-align vs a NumPy transcription of torchvision's CPU kernel and vs torchvision itself."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.ops import roi_align as tv_roi_align

from neco_jax.roi_align import roi_align

# Relative to the largest value, float32: measured 1.0e-6 vs the NumPy kernel (float64), 1.3e-6 vs torchvision;
# the feature gradient 1.2e-6 vs torchvision's. The bounds are 3x.
TOL, GRADIENT_TOL = 4e-6, 3.6e-6


def numpy_roi_align(features, box, k):
    """torchvision roi_align(aligned=True, sampling_ratio=-1, spatial_scale=1), one box, loops as in the kernel."""
    height, width, dim = features.shape
    x1, y1, x2, y2 = (float(c) - 0.5 for c in box)
    roi_h, roi_w = y2 - y1, x2 - x1
    bin_h, bin_w = roi_h / k, roi_w / k
    grid_h, grid_w = math.ceil(roi_h / k), math.ceil(roi_w / k)
    count = max(grid_h * grid_w, 1)
    out = np.zeros((k, k, dim))
    for ph in range(k):
        for pw in range(k):
            acc = np.zeros(dim)
            for iy in range(max(grid_h, 0)):
                y = y1 + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                for ix in range(max(grid_w, 0)):
                    x = x1 + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                    if y < -1.0 or y > height or x < -1.0 or x > width:
                        continue
                    yy, xx = max(y, 0.0), max(x, 0.0)
                    y0, x0 = int(yy), int(xx)
                    if y0 >= height - 1:
                        y0 = y1_ = height - 1
                        yy = float(y0)
                    else:
                        y1_ = y0 + 1
                    if x0 >= width - 1:
                        x0 = x1_ = width - 1
                        xx = float(x0)
                    else:
                        x1_ = x0 + 1
                    ly, lx = yy - y0, xx - x0
                    acc += (
                        (1 - ly) * (1 - lx) * features[y0, x0]
                        + (1 - ly) * lx * features[y0, x1_]
                        + ly * (1 - lx) * features[y1_, x0]
                        + ly * lx * features[y1_, x1_]
                    )
            out[ph, pw] = acc / count
    return out


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    b, h, w, d = 24, 9, 11, 4
    feats = rng.normal(size=(b, h, w, d)).astype(np.float32)
    xy = rng.uniform(-3, 12, size=(b, 2))
    wh = rng.uniform(0, 14, size=(b, 2))
    wh[0] = 0  # empty
    wh[1] = (-2, 1)  # inverted
    wh[2] = (0.3, 0.2)  # narrower than a cell
    xy[3], wh[3] = (-5, -5), (3, 3)  # fully outside
    xy[4], wh[4] = (-1.5, -1.5), (w + 3, h + 3)  # larger than the map
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    return feats, boxes


def test_equals_numpy_and_torchvision(case):
    feats, boxes = case
    out = np.asarray(jax.jit(roi_align)(feats, boxes))
    ref = np.stack([numpy_roi_align(f.astype(np.float64), b, 7) for f, b in zip(feats, boxes)])
    tv = (
        tv_roi_align(
            torch.tensor(feats).permute(0, 3, 1, 2),
            [torch.tensor(b[None]) for b in boxes],
            7,
            spatial_scale=1.0,
            sampling_ratio=-1,
            aligned=True,
        )
        .permute(0, 2, 3, 1)
        .numpy()
    )
    scale = np.abs(ref).max()
    print(f"vs NumPy {np.abs(out - ref).max() / scale:.2e}, vs torchvision {np.abs(out - tv).max() / scale:.2e}")
    assert np.abs(out - ref).max() <= TOL * scale
    assert np.abs(out - tv).max() <= TOL * scale
    assert np.all(out[0] == 0) and np.all(out[1] == 0) and np.all(out[3] == 0)


def test_several_boxes_per_map(case):
    feats, boxes = case
    many = np.asarray(roi_align(feats[:4], np.stack([boxes[4:8], boxes[8:12]], 1), 3))
    for j, sl in enumerate((slice(4, 8), slice(8, 12))):
        np.testing.assert_allclose(many[:, j], np.asarray(roi_align(feats[:4], boxes[sl], 3)), atol=1e-6)


def test_gradient_wrt_features_equals_torchvision(case):
    feats, boxes = case
    weights = np.random.default_rng(1).normal(size=(len(boxes), 7, 7, feats.shape[-1])).astype(np.float32)
    grad = jax.grad(lambda f: jnp.sum(roi_align(f, boxes) * weights))(feats)
    ft = torch.tensor(feats).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    out = tv_roi_align(ft, [torch.tensor(b[None]) for b in boxes], 7, aligned=True)
    (out * torch.tensor(weights).permute(0, 3, 1, 2)).sum().backward()
    ref = ft.grad.permute(0, 2, 3, 1).numpy()
    err = np.abs(np.asarray(grad) - ref).max() / np.abs(ref).max()
    print(f"feature gradient vs torchvision {err:.2e}")
    assert err <= GRADIENT_TOL
