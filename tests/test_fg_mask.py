"""Attention foreground mask vs the original recipe in torch (GaussianBlur, sort/cumsum, skimage label)."""

import jax
import numpy as np
import torch
from skimage.measure import label
from torchvision.transforms import GaussianBlur

from neco_jax.fg_mask import attention_fg_mask, gaussian_blur


def reference_mask(attn_cls, side, threshold=0.6, sigma=0.6):
    """The original's process_attentions on head-averaged attention (B, 1, side, side)."""
    attn = torch.tensor(attn_cls).mean(1).reshape(-1, 1, side, side)
    attn = GaussianBlur(7, sigma=sigma)(attn).reshape(attn.size(0), 1, side * side)
    val, idx = torch.sort(attn)
    val /= torch.sum(val, dim=-1, keepdim=True)
    th = torch.cumsum(val, dim=-1) > (1 - threshold)
    th[:, 0] = torch.gather(th[:, 0], dim=1, index=torch.argsort(idx)[:, 0])
    th = th.reshape(-1, 1, side, side).float()
    for j in range(th.shape[0]):
        lab = label(th[j].numpy())
        for k in range(1, lab.max() + 1):
            if (lab == k).sum() <= 2:
                th[j, 0][torch.tensor(lab[0] == k)] = 0
    return th[:, 0].numpy()


# Jitted: op by op, the blur's shifted slices and the component loop cost seconds per call.
fg_mask = jax.jit(attention_fg_mask, static_argnames=("grid", "threshold", "blur_size", "blur_sigma", "min_component"))


def test_mask_equals_original_recipe():
    rng = np.random.default_rng(0)
    side = 9
    logits = rng.normal(size=(6, 3, side * side)) * 2.0
    attn = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    attn = attn.astype(np.float32)
    ours = np.asarray(fg_mask(attn, grid=(side, side)))
    ref = reference_mask(attn, side)
    assert ours.shape == ref.shape
    assert (ours == ref).mean() == 1.0
    assert 0 < ref.mean() < 1  # a non-trivial mask
    grouped = np.asarray(fg_mask(attn.reshape(3, 2, 3, side * side), grid=(side, side)))
    np.testing.assert_array_equal(grouped.reshape(6, side, side), ref)  # (B, G, heads, N) as the trainer passes
    # Small components are removed: isolated peaks produce no foreground.
    spiky = np.full((1, 1, side * side), 1e-4, np.float32)
    spiky[0, 0, [0, 40]] = 1.0
    assert float(np.asarray(fg_mask(spiky, grid=(side, side), threshold=0.2, blur_sigma=0.1)).sum()) == 0


def test_gaussian_blur_matches_torchvision():
    maps = np.random.default_rng(0).random((3, 9, 9)).astype(np.float32)
    ref = GaussianBlur(7, sigma=0.6)(torch.from_numpy(maps)[:, None])[:, 0].numpy()
    blurred = jax.jit(gaussian_blur, static_argnums=(1, 2))(maps, 7, 0.6)
    np.testing.assert_allclose(np.asarray(blurred), ref, rtol=1e-5, atol=1e-7)
