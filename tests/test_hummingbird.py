"""Hummingbird dense NN retrieval: memory-bank pieces against loop/torch references, and end to end on tiny VOC."""

import functools

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from eval_fixtures import make_voc_dataset, noise_features, oracle_features
from PIL import Image

from evaluation import datasets
from evaluation import hummingbird as hb
from evaluation import memory_bank as mb
from neco_jax import errors

# ----------------------------------------------------------------------------- patch labels and selection


def reference_patch_labels(mask, patch_size, num_classes):
    """The reference's loop: 255 -> 0, one-hot mean over each patch's pixels, times the patch area."""
    mask = np.where(mask == 255, 0, mask)
    s_h, s_w = mask.shape[0] // patch_size, mask.shape[1] // patch_size
    out = np.zeros((s_h * s_w, num_classes))
    for i in range(s_h):
        for j in range(s_w):
            patch = mask[i * patch_size : (i + 1) * patch_size, j * patch_size : (j + 1) * patch_size]
            out[i * s_w + j] = np.eye(num_classes)[patch.ravel()].sum(0)
    return out


def reference_selection(counts, n, uniform):
    """open-hummingbird-eval's sample_features for one image, written with per-patch loops."""
    classes = [np.flatnonzero(row) for row in counts]
    freq = np.zeros(counts.shape[1])
    for cs in classes:
        freq[cs] += 1
    scores = np.array([freq[cs].sum() if len(cs) else 1e6 for cs in classes])
    scores = np.where([len(cs) > 0 for cs in classes], scores * uniform, scores)
    return np.argsort(scores, kind="stable")[:n]


def test_patch_label_counts_match_the_reference_loop():
    rng = np.random.default_rng(0)
    masks = rng.integers(0, 5, size=(2, 12, 8)).astype(np.uint8)
    masks[masks == 4] = 255
    counts = mb.patch_label_counts(masks, 4, 4)
    assert counts.dtype == np.uint8  # 16 pixels per patch fit
    for b in range(2):
        np.testing.assert_array_equal(counts[b], reference_patch_labels(masks[b], 4, 4))
    assert mb.patch_label_counts(np.zeros((1, 16, 16), np.uint8), 16, 2).dtype == np.uint16  # 256 pixels


def test_selection_matches_the_reference_and_keeps_rare_classes():
    labels = np.zeros((16, 16), np.uint8)  # 4x4 patches of 4x4 pixels
    labels[:, 8:] = 1  # common classes: 0 and 1 cover 7 patches each
    labels[0:4, 0:4] = 2  # rare class: one whole patch (index 0)
    labels[12:16, 12:16] = 3  # rare class: one whole patch (index 15)
    labels[5, 5] = 1  # a mixed patch (index 5): scores 7 + 8, the highest
    counts = mb.patch_label_counts(labels[None], 4, 4)[0]
    for seed in range(5):
        uniform = np.random.default_rng(seed).random(16)
        np.testing.assert_array_equal(mb.select_patches(counts, 6, uniform), reference_selection(counts, 6, uniform))
    # Without the noise the score is the summed class frequency: rare patches first, the mixed patch last.
    order = mb.select_patches(counts, 16, np.ones(16))
    assert set(order[:2]) == {0, 15}
    assert order[-1] == 5


@pytest.mark.parametrize(
    "num_images,expected",
    [
        (10_582, 483),  # VOC trainaug, 2 passes (reference: 10,240,000 // 21,164)
        (20_210, 253),  # ADE20k training
        (1_320, None),  # VOC 1/8: 3,878 >= 1,296 patches per image -> unbounded
        (80, None),  # VOC 1/128: the bounded rule cannot work -> every patch
    ],
)
def test_patches_per_image_and_the_unbounded_fallback(num_images, expected):
    assert mb.patches_per_image(10_240_000, num_images, 2, 36 * 36) == expected


def test_a_memory_smaller_than_one_patch_per_image_is_a_user_error():
    with pytest.raises(errors.ConfigError, match="raise memory_size"):
        mb.patches_per_image(100, 80, 2, 1296)


# ----------------------------------------------------------------------------- augmentation parity


def test_color_jitter_matches_torchvision_ops_with_the_same_draws():
    img = (np.random.default_rng(2).random((24, 30, 3)) * 255).astype(np.uint8)
    for seed in range(6):
        ours = mb.color_jitter(img, np.random.default_rng(seed), 0.1)
        rng = np.random.default_rng(seed)
        ref = Image.fromarray(img)
        for op in (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation):
            if rng.random() < 0.5:
                ref = op(ref, rng.uniform(0.9, 1.1))
        if rng.random() < 0.5:
            ref = TF.adjust_hue(ref, rng.uniform(-0.1, 0.1))
        np.testing.assert_array_equal(ours, np.asarray(ref))


def test_train_view_matches_torchvision_resized_crop():
    rng = np.random.default_rng(3)
    image = (rng.random((40, 52, 3)) * 255).astype(np.uint8)
    mask = rng.integers(0, 21, size=(40, 52)).astype(np.uint8)
    view, view_mask = mb.train_view(image, mask, np.random.default_rng(7), size=28, jitter=0.0)
    top, left, h, w = mb.random_resized_crop_params(np.random.default_rng(7), 52, 40, mb.CROP_SCALE, mb.CROP_RATIO)
    img_t = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)
    ref = TF.resized_crop(img_t, top, left, h, w, [28, 28], antialias=True).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(view, ref, rtol=1e-5, atol=1e-3)  # 0..255 scale
    mask_t = torch.from_numpy(mask)[None].float()
    ref_mask = TF.resized_crop(mask_t, top, left, h, w, [28, 28], interpolation=TF.InterpolationMode.NEAREST)
    np.testing.assert_array_equal(view_mask, ref_mask[0].numpy().astype(np.uint8))


def test_resize_weights_match_torch_antialiased_bilinear():
    x = np.random.default_rng(4).random((1, 1, 500, 3)).astype(np.float32)
    for out in (504, 333, 37):
        ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=(out, 3), mode="bilinear", antialias=True)
        np.testing.assert_allclose(mb.resize_weights(500, out) @ x[0, 0], ref[0, 0].numpy(), rtol=1e-5, atol=1e-6)


def test_std_typo_restandardisation():
    rgb = np.random.default_rng(5).random((4, 3)).astype(np.float32)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    correct = (rgb - mean) / np.array([0.229, 0.224, 0.225], np.float32)
    typo = (rgb - mean) / np.array([0.229, 0.224, 0.255], np.float32)
    np.testing.assert_allclose(mb.restandardise(correct, True), typo, rtol=1e-6)
    np.testing.assert_array_equal(mb.restandardise(correct, False), correct)


# ----------------------------------------------------------------------------- fractions and end to end


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = make_voc_dataset(tmp_path_factory.mktemp("voc"), num_train=8, num_val=6)
    return root, datasets.open_dataset("voc", root, "trainaug"), datasets.open_dataset("voc", root, "val")


SMALL = dict(input_size=56, batch_size=4, search_dtype="float32", memory_chunk=1024, num_threads=2)


def test_fraction_lists_select_the_named_images(voc, tmp_path):
    _, train, _ = voc
    path = mb.fraction_list_path(tmp_path, "voc", 128, 42)
    assert path.as_posix().endswith("voc/1_div_128/trainaug_128_42.txt")
    with pytest.raises(errors.DatasetError, match="file_sets_dir"):
        mb.read_fraction_list(path)
    path.parent.mkdir(parents=True)
    names = [train.image_paths[5].stem, train.image_paths[2].stem]
    path.write_text("\n".join(names) + "\n")
    subset = mb.subset_by_names(train, mb.read_fraction_list(path))
    assert [p.stem for p in subset.image_paths] == names
    with pytest.raises(errors.DatasetError, match="not in the voc"):
        mb.subset_by_names(train, ["2099_000000"])


def test_small_fraction_falls_back_to_the_unbounded_memory(voc):
    _, train, _ = voc
    two = train.subset([0, 1])
    fn = functools.partial(noise_features, patch_size=4)
    # 2 images x 2 passes; 10,240,000 // 4 is far above the 196 patches of a 56 px view: keep them all.
    common = dict(input_size=56, patch_size=4, passes=2, jitter=0.1, batch_size=4, num_threads=2)
    bank = mb.build_memory_bank(two, fn, memory_size=10_240_000, **common)
    assert len(bank) == 2 * 2 * 196
    bounded = mb.build_memory_bank(two, fn, memory_size=200, **common)
    assert len(bounded) == 4 * 50
    np.testing.assert_allclose(np.linalg.norm(bank.keys, axis=1), 1.0, rtol=1e-5)
    assert (bank.label_counts.sum(axis=1) == 16).all()  # every pixel (void included, as class 0) counted


@pytest.mark.slow
def test_retrieval_is_near_perfect_for_separable_features(voc):
    _, train, val = voc
    # The oracle reads classes from colours, so colour jitter (which can move a colour to another class's)
    # is switched off here; it is checked against torchvision above.
    settings = hb.RetrievalSettings(**SMALL, memory_size=8 * 2 * 100, jitter=0.0, num_visualize=2)
    oracle = functools.partial(oracle_features, patch_size=4)
    out = hb.evaluate_retrieval(train, val, oracle, patch_size=4, settings=settings)
    assert out["miou"] > 0.9
    assert out["memory_patches"] == 8 * 2 * 100
    image, gt, pred = out["examples"][0]
    assert image.shape == (56, 56, 3) and gt.shape == pred.shape == (56, 56)


def test_retrieval_is_near_chance_for_noise(voc):
    _, train, val = voc
    settings = hb.RetrievalSettings(**SMALL, memory_size=0)
    noise = functools.partial(noise_features, patch_size=4)
    out = hb.evaluate_retrieval(train, val, noise, patch_size=4, settings=settings)
    assert 0.0 <= out["miou"] < 0.15


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    from flax import nnx

    from neco_jax import save_backbone
    from neco_jax.models import VisionTransformer, get_arch

    folder = tmp_path_factory.mktemp("backbone") / "vit_tiny"
    save_backbone(VisionTransformer(get_arch("vit_tiny_test"), rngs=nnx.Rngs(0)), folder)
    return str(folder)


@pytest.mark.slow
def test_job_writes_results_and_pictures(voc, tiny_backbone, tmp_path):
    import json

    from configs.eval import voc_hummingbird
    from evaluation.runner import run_job

    root, _, _ = voc
    config = voc_hummingbird.get_config()
    config.update_from_flattened_dict(
        {
            "checkpoint": tiny_backbone,
            "data_dir": str(root),
            "workdir": str(tmp_path / "out"),
            "image_size": 56,
            "batch_size": 4,
            "num_threads": 2,
            "num_visualize": 2,
            "hummingbird.memory_chunk": 1024,
            "hummingbird.memory_size": 8 * 2 * 8,
        }
    )
    results = run_job(config)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert 0.0 <= saved["miou"] <= 1.0 and saved["miou"] == results["miou"]
    assert saved["memory_patches"] == 8 * 2 * 8 and saved["std"] == "0.225"
    assert sorted(p.name for p in (tmp_path / "out" / "retrieval").iterdir()) == ["example_000.png", "example_001.png"]
