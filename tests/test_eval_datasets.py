"""Dataset readers: layouts, label mappings (against the reference's own formulations) and every bad-input case."""

import json
import random

import numpy as np
import pytest
from eval_fixtures import make_voc_dataset
from PIL import Image

from evaluation import datasets
from neco_jax.errors import DatasetError


@pytest.fixture(scope="module")
def voc_dir(tmp_path_factory):
    return make_voc_dataset(tmp_path_factory.mktemp("voc"), num_train=6, num_val=5)


def test_voc_splits_and_mask_folders(voc_dir):
    train = datasets.open_dataset("voc", voc_dir, "trainaug")
    val = datasets.open_dataset("voc", voc_dir, "val")
    assert (len(train), len(datasets.open_dataset("voc", voc_dir, "train")), len(val)) == (6, 3, 5)
    assert train.mask_paths[0].parent.name == "SegmentationClassAug"
    assert val.mask_paths[0].parent.name == "SegmentationClass"  # palette PNGs, read as indices
    image, mask = val[0]
    assert image.dtype == np.uint8 and image.shape[2] == 3 and mask.shape == image.shape[:2]
    assert set(np.unique(mask)) <= set(range(21)) | {255}
    assert (val.num_classes, val.ignore_index) == (21, 255)
    # The palette mask holds the same indices as the grayscale one written from the same array.
    aug = np.asarray(Image.open(voc_dir / "VOCSegmentation/SegmentationClassAug" / val.mask_paths[0].name))
    np.testing.assert_array_equal(mask, aug)
    # data_dir may also be the VOCSegmentation folder itself, as for training (input_pipeline.sources.voc_folder).
    inner = datasets.open_dataset("voc", voc_dir / "VOCSegmentation", "val")
    assert inner.image_paths == val.image_paths and inner.mask_paths == val.mask_paths


def test_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="VOCSegmentation"):
        datasets.open_dataset("voc", tmp_path, "val")
    with pytest.raises(DatasetError, match="does not exist"):
        datasets.open_dataset("voc", tmp_path / "nowhere", "val")


def test_list_naming_a_missing_file(tmp_path):
    root = make_voc_dataset(tmp_path, num_train=2, num_val=2)
    sets = root / "VOCSegmentation/sets/val.txt"
    sets.write_text(sets.read_text() + "2011_999999\n")
    with pytest.raises(DatasetError, match="2011_999999.jpg"):
        datasets.open_dataset("voc", root, "val")
    with pytest.raises(DatasetError, match="sets/nosuch.txt"):
        datasets.open_dataset("voc", root, "nosuch")


def test_mask_size_mismatch_names_the_file(tmp_path):
    root = make_voc_dataset(tmp_path, num_train=2, num_val=2)
    ds = datasets.open_dataset("voc", root, "val")
    Image.fromarray(np.zeros((10, 12), np.uint8), mode="L").save(ds.mask_paths[1])
    ds[0]
    with pytest.raises(DatasetError, match=ds.mask_paths[1].name):
        ds[1]


def test_mask_label_outside_the_classes_names_file_and_label(tmp_path):
    root = make_voc_dataset(tmp_path, num_train=2, num_val=2)
    ds = datasets.open_dataset("voc", root, "val")
    labels = ds.mask(1)
    labels[0, :3] = (21, 40, 255)  # 255 is VOC's ignore value, 21 and 40 are no class
    Image.fromarray(labels, mode="L").save(ds.mask_paths[1])
    before = ds.mask_paths[1].read_bytes()
    ds[0]
    with pytest.raises(DatasetError) as info:
        ds[1]
    message = str(info.value)
    assert f"mask {ds.mask_paths[1]} holds label 21 (and 1 more: [40]), outside voc's classes 0..20" in message
    assert "\n" not in message and ds.mask_paths[1].read_bytes() == before


def test_corrupt_image_names_the_file(tmp_path):
    root = make_voc_dataset(tmp_path, num_train=2, num_val=2)
    ds = datasets.open_dataset("voc", root, "val")
    ds.image_paths[0].write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match=ds.image_paths[0].name):
        ds[0]


def test_unknown_dataset(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset"):
        datasets.open_dataset("pascal", tmp_path, "val")


# ---------------------------------------------------------------------------------------------------- COCO

_THING_SUPERCATS = [
    "person",
    "vehicle",
    "outdoor",
    "animal",
    "accessory",
    "sports",
    "kitchen",
    "food",
    "furniture",
    "electronic",
    "appliance",
    "indoor",
]
_STUFF_SUPERCATS = [
    "textile",
    "building",
    "raw-material",
    "furniture-stuff",
    "floor",
    "plant",
    "food-stuff",
    "ground",
    "structural",
    "water",
    "wall",
    "window",
    "ceiling",
    "sky",
    "solid",
]


def _panoptic_categories():
    cats = [{"id": 1 + i, "isthing": 1, "supercategory": s} for i, s in enumerate(_THING_SUPERCATS * 2)]
    cats += [{"id": 92 + i, "isthing": 0, "supercategory": s} for i, s in enumerate(_STUFF_SUPERCATS)]
    return cats


def _stuff_categories():
    cats = [{"id": 92 + i, "supercategory": s} for i, s in enumerate((_STUFF_SUPERCATS * 7)[:91])]  # 92..182
    return cats + [{"id": 183, "supercategory": "other"}]


def _make_coco(root, n_train=20, n_val=3):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / f"images/{split}2017").mkdir(parents=True)
        (root / f"annotations/{split}2017").mkdir(parents=True)
        (root / f"annotations/stuff_annotations/stuff_{split}2017_pixelmaps").mkdir(parents=True)
        for i in range(n):
            name = f"{i:012d}"
            image = rng.integers(0, 255, (16, 20, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / f"images/{split}2017/{name}.jpg")
            things = rng.choice([0, 1, 5, 13, 24, 92, 100, 255], size=(16, 20)).astype(np.uint8)
            Image.fromarray(things, mode="L").save(root / f"annotations/{split}2017/{name}.png")
            stuff = rng.choice([0, 92, 95, 120, 182, 183], size=(16, 20)).astype(np.uint8)
            Image.fromarray(stuff, mode="L").save(
                root / f"annotations/stuff_annotations/stuff_{split}2017_pixelmaps/{name}.png"
            )
    (root / "annotations/panoptic_annotations").mkdir(parents=True)
    (root / "annotations/panoptic_annotations/panoptic_val2017.json").write_text(
        json.dumps({"categories": _panoptic_categories()})
    )
    stuff_json = root / "annotations/stuff_annotations/stuff_val2017.json"
    stuff_json.write_text(json.dumps({"categories": _stuff_categories()}))
    return root


def _reference_things(mask, categories):
    """The reference COCOSegmentation 'thing' branch, restated."""
    sup = sorted({c["supercategory"] for c in categories if c["isthing"] == 1})
    cat_map = {c["id"]: (sup.index(c["supercategory"]) if c["isthing"] == 1 else 255) for c in categories}
    mask = mask.astype(np.int64).copy()
    mask[mask == 0] = 200
    out = mask.copy()
    for cid in np.unique(mask):
        out[mask == cid] = cat_map[cid] if (cid in cat_map and cid <= 200) else 255
    return out


def _reference_stuff(mask, categories):
    sup = sorted({c["supercategory"] for c in categories} - {"other"})
    to_id = {s: i for i, s in enumerate(sup)} | {"other": 255}
    cat_map = {c["id"]: to_id[c["supercategory"]] for c in categories}
    mask = mask.astype(np.int64).copy()
    mask[mask == 0] = 183
    out = mask.copy()
    for cid in np.unique(mask):
        out[mask == cid] = cat_map[cid]
    return out


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    return _make_coco(tmp_path_factory.mktemp("coco"))


@pytest.mark.parametrize("kind", ["things", "stuff"])
def test_coco_supercategory_mapping_equals_reference(coco_dir, kind):
    ds = datasets.open_dataset(f"coco_{kind}", coco_dir, "val")
    assert ds.num_classes == (12 if kind == "things" else 15) and ds.ignore_index == 255
    assert list(ds.class_names) == sorted(_THING_SUPERCATS if kind == "things" else _STUFF_SUPERCATS)
    cats = _panoptic_categories() if kind == "things" else _stuff_categories()
    ref_fn = _reference_things if kind == "things" else _reference_stuff
    for i in range(len(ds)):
        raw = np.asarray(Image.open(ds.mask_paths[i]))
        np.testing.assert_array_equal(ds.mask(i), ref_fn(raw, cats))


def test_coco_train_subset_is_the_seeded_ten_percent(coco_dir):
    ds = datasets.open_dataset("coco_things", coco_dir, "train", seed=400)
    listing_train = sorted(p.name for p in (coco_dir / "images/train2017").iterdir())
    listing_val = sorted(p.name for p in (coco_dir / "images/val2017").iterdir())
    random.seed(400)  # the reference: seed_everything(400); shuffle(val); shuffle(train); first 10%
    random.shuffle(listing_val)
    random.shuffle(listing_train)
    assert [p.name for p in ds.image_paths] == listing_train[: int(len(listing_train) * 0.1)]
    assert len(datasets.open_dataset("coco_things", coco_dir, "val")) == 3


def test_coco_missing_category_file(tmp_path):
    root = _make_coco(tmp_path, n_train=2, n_val=1)
    (root / "annotations/stuff_annotations/stuff_val2017.json").unlink()
    with pytest.raises(DatasetError, match="stuff_val2017.json"):
        datasets.open_dataset("coco_stuff", root, "val")


# ---------------------------------------------------------------------------------------------------- ADE20k


def test_ade20k_layout_and_ignore_zero(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    rng = np.random.default_rng(1)
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(2):
            name = f"ADE_{split}_{i:08d}"
            image = rng.integers(0, 255, (12, 15, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / "images" / split / f"{name}.jpg")
            ann = rng.integers(0, 151, (12, 15)).astype(np.uint8)
            Image.fromarray(ann, mode="L").save(root / "annotations" / split / f"{name}.png")
    ds = datasets.open_dataset("ade20k", tmp_path, "validation")  # the parent folder works too
    assert (len(ds), ds.num_classes, ds.ignore_index) == (2, 151, 0)
    np.testing.assert_array_equal(ds.mask(0), np.asarray(Image.open(ds.mask_paths[0])))
    (root / "annotations/training" / "ADE_training_00000001.png").unlink()
    with pytest.raises(DatasetError, match="ADE_training_00000001.png"):
        datasets.open_dataset("ade20k", root, "training")


# ---------------------------------------------------------------------------------------------------- Cityscapes


def _reference_cityscapes(mask):
    """The reference's `_class_to_index`: digitize over ids -1..33, then its key table."""
    inv = 255
    key = np.array(
        [
            inv,
            inv,
            inv,
            inv,
            inv,
            inv,
            inv,
            inv,
            0,
            1,
            inv,
            inv,
            2,
            3,
            4,
            inv,
            inv,
            inv,
            5,
            inv,
            6,
            7,
            8,
            9,
            10,
            11,
            12,
            13,
            14,
            15,
            inv,
            inv,
            16,
            17,
            18,
        ]
    )
    mapping = np.array(range(-1, len(key) - 1)).astype("int32")
    index = np.digitize(mask.ravel(), mapping, right=True)
    return key[index].reshape(mask.shape)


def test_cityscapes_label_ids_to_train_ids(tmp_path):
    for split in ("train", "val"):
        (tmp_path / "leftImg8bit" / split / "aachen").mkdir(parents=True)
        (tmp_path / "gtFine" / split / "aachen").mkdir(parents=True)
    labels = np.arange(34, dtype=np.uint8).repeat(3).reshape(6, 17)
    name = "aachen_000000_000019"
    Image.fromarray(np.zeros((6, 17, 3), np.uint8)).save(tmp_path / f"leftImg8bit/val/aachen/{name}_leftImg8bit.png")
    Image.fromarray(labels, mode="L").save(tmp_path / f"gtFine/val/aachen/{name}_gtFine_labelIds.png")
    ds = datasets.open_dataset("cityscapes", tmp_path, "val")
    assert (len(ds), ds.num_classes, ds.ignore_index) == (1, 19, 255)
    np.testing.assert_array_equal(ds.mask(0), _reference_cityscapes(labels))
    assert sorted(set(ds.mask(0).ravel()) - {255}) == list(range(19))
    with pytest.raises(DatasetError, match="no images"):
        datasets.open_dataset("cityscapes", tmp_path, "train")
