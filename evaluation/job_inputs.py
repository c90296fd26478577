"""What a protocol reads through its job config: the dataset split (cut to `num_images`) and the frozen backbone
(or the backbone in memory it is given, e.g. the teacher of a running training)."""

from __future__ import annotations

import ml_collections

from evaluation import datasets as datasets_lib
from evaluation import features as features_lib
from neco_jax.errors import ConfigError


def open_split(config: ml_collections.ConfigDict, split: str) -> datasets_lib.SegmentationDataset:
    """The dataset split named `split`, cut to `config.num_images` when that is set."""
    kwargs = {}
    if config.dataset.startswith("coco"):
        kwargs = {"seed": config.coco_seed, "fraction": config.coco_train_fraction}
    ds = datasets_lib.open_dataset(config.dataset, config.data_dir, split, **kwargs)
    if config.num_classes != ds.num_classes:
        raise ConfigError(f"config.num_classes={config.num_classes} but {config.dataset} has {ds.num_classes} classes")
    if config.num_images:
        ds = ds.subset(range(min(config.num_images, len(ds))))
    return ds


def make_extractor(
    config: ml_collections.ConfigDict, model=None, *, registers: bool = True
) -> features_lib.FeatureExtractor:
    """The frozen backbone `model` (None: the one of `config.checkpoint`), jitted and sharded over all devices;
    `registers=False` builds it without register tokens, as the reference's CBFE script does."""
    if model is None:
        model = features_lib.load_model(config.checkpoint, arch=config.arch, which=config.checkpoint_model)
    if not registers:
        model = features_lib.without_registers(model)
    return features_lib.FeatureExtractor(model, dtype=config.dtype, name=config.checkpoint)
