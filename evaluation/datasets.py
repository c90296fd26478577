"""Readers for the segmentation datasets of the dense evaluations, in the folder layouts the original code expects.

Each reader returns a `SegmentationDataset`: paired image and mask paths plus a 256-entry lookup table that turns
raw mask values into training labels (`ignore_index` for everything that is not a class). Images are decoded as
RGB uint8, masks as their raw indices (never through an RGB conversion). Everything a user can get wrong (a
missing folder, a list naming a missing file, a mask whose size differs from its image) is a `DatasetError`
naming the file.

Layouts (those of NeCo's `data/` readers in vpariza/NeCo; docs/evaluation.md):
- voc:          data_dir[/VOCSegmentation]/{images/*.jpg, SegmentationClass/*.png, SegmentationClassAug/*.png,
                sets/{trainaug,train,val}.txt} (data_dir = VOCSegmentation or its parent, the rule training's reader
                shares: input_pipeline.sources.voc_folder); train lists read SegmentationClassAug, val reads
                SegmentationClass.
- coco_things / coco_stuff: data_dir/images/{train,val}2017/*.jpg; things masks data_dir/annotations/{split}2017/*.png
                with categories from annotations/panoptic_annotations/panoptic_val2017.json; stuff masks
                annotations/stuff_annotations/stuff_{split}2017_pixelmaps/*.png with stuff_val2017.json.
- ade20k:       data_dir (= ADEChallengeData2016, or its parent)/{images,annotations}/{training,validation}.
- cityscapes:   data_dir/leftImg8bit/{split}/<city>/*_leftImg8bit.png, gtFine/{split}/<city>/*_gtFine_labelIds.png.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image

from input_pipeline.sources import voc_folder
from neco_jax.errors import DatasetError

VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

# Cityscapes labelIds (0..33) -> the 19 train ids; every other id is ignored (255).
CITYSCAPES_LABEL_TO_TRAIN = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}

CITYSCAPES_CLASSES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a reader gives: the split names the evaluations fit on and score, the classes and the ignored label."""

    train_split: str
    val_split: str
    num_classes: int
    ignore_index: int


DATASETS = {
    "voc": DatasetInfo("trainaug", "val", 21, 255),
    "coco_things": DatasetInfo("train", "val", 12, 255),
    "coco_stuff": DatasetInfo("train", "val", 15, 255),
    "ade20k": DatasetInfo("training", "validation", 151, 0),
    "cityscapes": DatasetInfo("train", "val", 19, 255),
}
DATASET_NAMES = tuple(DATASETS)
# COCO's training images: the reference's random 10% of train2017 (`random.shuffle` after seeding 400).
COCO_TRAIN_FRACTION = 0.1
COCO_SEED = 400


@dataclasses.dataclass(frozen=True)
class SegmentationDataset:
    """Paired image/mask files of one split; `self[i]` gives (RGB uint8 (H, W, 3), labels uint8 (H, W))."""

    name: str
    split: str
    image_paths: tuple[Path, ...]
    mask_paths: tuple[Path, ...]
    num_classes: int
    ignore_index: int
    label_map: np.ndarray | None = None  # (256,) uint8 raw mask value -> label; None keeps values as they are
    class_names: tuple[str, ...] = ()  # label -> name where the dataset defines them (empty: unknown)

    def __len__(self) -> int:
        return len(self.image_paths)

    def image(self, i: int) -> np.ndarray:
        return _read_image(self.image_paths[i])

    def mask(self, i: int) -> np.ndarray:
        raw = _read_mask(self.mask_paths[i])
        labels = raw if self.label_map is None else self.label_map[raw]
        outside = np.unique(labels[(labels >= self.num_classes) & (labels != self.ignore_index)])
        if outside.size:  # would index past the confusion matrix and per-class tables downstream
            more = f" (and {outside.size - 1} more: {outside[1:6].tolist()})" if outside.size > 1 else ""
            raise DatasetError(
                f"mask {self.mask_paths[i]} holds label {outside[0]}{more}, outside {self.name}'s classes "
                f"0..{self.num_classes - 1} (ignored: {self.ignore_index}); fix the mask, or check it belongs to "
                f"{self.name}"
            )
        return labels

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        image, mask = self.image(i), self.mask(i)
        if image.shape[:2] != mask.shape:
            raise DatasetError(
                f"mask {self.mask_paths[i]} is {mask.shape[1]}x{mask.shape[0]} but its image {self.image_paths[i]} is "
                f"{image.shape[1]}x{image.shape[0]}; regenerate the mask at the image's size"
            )
        return image, mask

    def subset(self, indices) -> SegmentationDataset:
        """The same dataset restricted to `indices` (in that order)."""
        indices = list(indices)
        return dataclasses.replace(
            self,
            image_paths=tuple(self.image_paths[i] for i in indices),
            mask_paths=tuple(self.mask_paths[i] for i in indices),
        )


def _read_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read image {path} ({e}); replace or remove the file") from e


def _read_mask(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "I", "I;16"):
                raise DatasetError(
                    f"mask {path} has mode {im.mode}; masks must be single-channel index PNGs (mode P or L)"
                )
            arr = np.asarray(im)
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read mask {path} ({e}); replace or remove the file") from e
    if arr.max(initial=0) > 255:
        raise DatasetError(f"mask {path} holds values above 255; expected 8-bit class indices")
    return arr.astype(np.uint8)


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{what} folder {path} does not exist; check --config.data_dir and the dataset layout")
    return path


def _check_files(paths, what: str) -> None:
    for p in paths:
        if not p.is_file():
            raise DatasetError(f"{what} {p} is missing; fix the file list or restore the file")


def _make(name, split, images, masks, label_map=None, class_names=()) -> SegmentationDataset:
    images, masks = tuple(images), tuple(masks)
    _check_files(images, "image")
    _check_files(masks, "mask")
    if not images:
        raise DatasetError(f"{name} split {split!r} has no images; check --config.data_dir")
    info = DATASETS[name]
    return SegmentationDataset(
        name, split, images, masks, info.num_classes, info.ignore_index, label_map, tuple(class_names)
    )


def voc(data_dir: str | os.PathLike, split: str) -> SegmentationDataset:
    """Pascal VOC 2012: `split` names sets/<split>.txt (trainaug, train, val); 21 classes, ignore 255."""
    root = Path(voc_folder(data_dir))
    seg = "SegmentationClass" if split == "val" else "SegmentationClassAug"  # as the reference's VOCDataset
    image_dir = _require_dir(root / "images", "VOC images")
    seg_dir = _require_dir(root / seg, f"VOC {seg}")
    list_file = root / "sets" / f"{split}.txt"
    if not list_file.is_file():
        raise DatasetError(f"VOC list {list_file} does not exist; expected one of sets/{{trainaug,train,val}}.txt")
    names = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    return _make(
        "voc",
        split,
        [image_dir / f"{n}.jpg" for n in names],
        [seg_dir / f"{n}.png" for n in names],
        class_names=VOC_CLASSES,
    )


def _coco_categories(json_path: Path) -> list[dict]:
    if not json_path.is_file():
        raise DatasetError(f"COCO category file {json_path} does not exist; it provides the supercategory mapping")
    try:
        return json.loads(json_path.read_text())["categories"]
    except (ValueError, KeyError) as e:
        raise DatasetError(f"COCO category file {json_path} is not a COCO json with 'categories' ({e})") from e


def coco_things_label_map(categories: list[dict]) -> np.ndarray:
    """Panoptic category id -> index of its thing supercategory (sorted names, 12 of them); stuff and 0 -> 255."""
    supercats = sorted({c["supercategory"] for c in categories if c["isthing"] == 1})
    index = {s: i for i, s in enumerate(supercats)}
    table = np.full(256, 255, dtype=np.uint8)
    for c in categories:
        if c["isthing"] == 1 and c["id"] <= 200:  # the reference maps only ids <= 200; 0 (unlabelled) is stuff
            table[c["id"]] = index[c["supercategory"]]
    return table


def coco_stuff_label_map(categories: list[dict]) -> np.ndarray:
    """Stuff pixelmap id (92..182) -> index of its supercategory (sorted names minus "other", 15 of them);
    0 (things), 183 ("other") and anything unknown -> 255."""
    supercats = sorted({c["supercategory"] for c in categories} - {"other"})
    index = {s: i for i, s in enumerate(supercats)}
    table = np.full(256, 255, dtype=np.uint8)
    for c in categories:
        if c["supercategory"] != "other":
            table[c["id"]] = index[c["supercategory"]]
    return table


def coco_file_lists(
    data_dir: str | os.PathLike, *, seed: int = COCO_SEED, fraction: float = COCO_TRAIN_FRACTION
) -> tuple[list, list]:
    """(train subset, val) image file names as the reference draws them: `random.shuffle` of the val listing,
    then of the train listing, from one generator seeded `seed`; the first `fraction` of the shuffled train list.

    The reference shuffles `os.listdir` order; we shuffle the sorted listing so the subset is reproducible
    (identical to the reference wherever its listing happened to be sorted)."""
    images = _require_dir(Path(data_dir) / "images", "COCO images")
    train = sorted(os.listdir(_require_dir(images / "train2017", "COCO train2017")))
    val = sorted(os.listdir(_require_dir(images / "val2017", "COCO val2017")))
    rng = random.Random(seed)
    rng.shuffle(val)
    rng.shuffle(train)
    return train[: int(len(train) * fraction)], val


def coco(
    data_dir: str | os.PathLike, split: str, *, kind: str, seed: int = COCO_SEED, fraction: float = COCO_TRAIN_FRACTION
) -> SegmentationDataset:
    """COCO-Things (12 classes) or COCO-Stuff (15 classes), ignore 255; split "train" is the seeded 10% subset."""
    root = Path(data_dir)
    if split not in ("train", "val"):
        raise DatasetError(f"COCO split must be 'train' or 'val', got {split!r}")
    if kind == "things":
        seg_dir = root / "annotations" / f"{split}2017"
        cats = _coco_categories(root / "annotations/panoptic_annotations/panoptic_val2017.json")
        table = coco_things_label_map(cats)
        names = sorted({c["supercategory"] for c in cats if c["isthing"] == 1})
    elif kind == "stuff":
        seg_dir = root / "annotations/stuff_annotations" / f"stuff_{split}2017_pixelmaps"
        cats = _coco_categories(root / "annotations/stuff_annotations/stuff_val2017.json")
        table = coco_stuff_label_map(cats)
        names = sorted({c["supercategory"] for c in cats} - {"other"})
    else:
        raise ValueError(f"kind must be 'things' or 'stuff', got {kind!r}")
    _require_dir(seg_dir, f"COCO-{kind} masks")
    train, val = coco_file_lists(root, seed=seed, fraction=fraction)
    files = train if split == "train" else sorted(val)  # train keeps the drawn order, as the reference loader
    image_dir = root / "images" / f"{split}2017"
    masks = [seg_dir / (Path(f).stem + ".png") for f in files]
    num_classes = DATASETS[f"coco_{kind}"].num_classes
    if len(names) != num_classes:
        raise DatasetError(f"COCO-{kind} categories give {len(names)} supercategories, expected {num_classes}")
    return _make(f"coco_{kind}", split, [image_dir / f for f in files], masks, table, names)


def ade20k(data_dir: str | os.PathLike, split: str) -> SegmentationDataset:
    """ADE20k SceneParse150: split "training" or "validation"; 151 labels with 0 ("other") ignored."""
    root = Path(data_dir)
    if (root / "ADEChallengeData2016").is_dir():
        root = root / "ADEChallengeData2016"
    image_dir = _require_dir(root / "images" / split, f"ADE20k images/{split}")
    ann_dir = _require_dir(root / "annotations" / split, f"ADE20k annotations/{split}")
    names = sorted(p.stem for p in image_dir.iterdir() if p.suffix.lower() == ".jpg")
    images, masks = [image_dir / f"{n}.jpg" for n in names], [ann_dir / f"{n}.png" for n in names]
    return _make("ade20k", split, images, masks)


def cityscapes_label_map() -> np.ndarray:
    table = np.full(256, 255, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_LABEL_TO_TRAIN.items():
        table[label_id] = train_id
    return table


def cityscapes(data_dir: str | os.PathLike, split: str) -> SegmentationDataset:
    """Cityscapes fine annotations: labelIds mapped to the 19 train ids, everything else 255."""
    root = Path(data_dir)
    image_root = _require_dir(root / "leftImg8bit" / split, f"Cityscapes leftImg8bit/{split}")
    mask_root = _require_dir(root / "gtFine" / split, f"Cityscapes gtFine/{split}")
    images = sorted(image_root.glob("*/*_leftImg8bit.png"))
    masks = [mask_root / p.parent.name / p.name.replace("_leftImg8bit", "_gtFine_labelIds") for p in images]
    return _make("cityscapes", split, images, masks, cityscapes_label_map(), CITYSCAPES_CLASSES)


def open_dataset(name: str, data_dir: str | os.PathLike, split: str, **kwargs) -> SegmentationDataset:
    """The reader for `name` (one of DATASET_NAMES) on `split` (dataset-specific split names, see each reader)."""
    if not Path(data_dir).is_dir():
        raise DatasetError(f"data_dir {data_dir} does not exist; pass --config.data_dir=<folder holding the dataset>")
    if name == "voc":
        return voc(data_dir, split)
    if name == "coco_things":
        return coco(data_dir, split, kind="things", **kwargs)
    if name == "coco_stuff":
        return coco(data_dir, split, kind="stuff", **kwargs)
    if name == "ade20k":
        return ade20k(data_dir, split)
    if name == "cityscapes":
        return cityscapes(data_dir, split)
    raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
