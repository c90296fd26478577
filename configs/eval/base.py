"""Shared fields of every evaluation job; `configs/eval/<dataset>_<protocol>.py` call `get_eval_config`.

A protocol's section (`config.linear`, `config.overcluster`, ...) is built from the defaults of its settings
dataclass (`evaluation.linear.LinearSettings`, `evaluation.overcluster.OverclusterSettings`, ...), where each
field is documented and its default written once; the job files change only what a dataset's reference
loader does differently. docs/evaluation.md lists the protocols' settings and their sources. The returned
config is locked: overriding a field that does not exist (`--config.typo=1`) is an error.
"""

import ml_collections

from evaluation import datasets, linear, overcluster
from evaluation.settings import config_section


def get_eval_config(dataset: str, protocol: str, **protocol_overrides) -> ml_collections.ConfigDict:
    """The locked config of `protocol` on `dataset`; `protocol_overrides` change protocol fields' defaults."""
    c = common_fields(dataset, protocol)
    {"linear": linear_fields, "overcluster": overcluster_fields}[protocol](c)
    getattr(c, protocol).update(protocol_overrides)
    c.lock()
    return c


def common_fields(dataset: str, protocol: str) -> ml_collections.ConfigDict:
    """Fields every evaluation job has (unlocked, so a protocol file can add its own section)."""
    info = datasets.DATASETS[dataset]
    c = ml_collections.ConfigDict()
    # Which evaluation: the module evaluation.<protocol> runs it.
    c.protocol = protocol
    # Dataset reader name (evaluation.datasets.open_dataset) and its folder (layouts in evaluation/datasets.py).
    c.dataset = dataset
    c.data_dir = ""
    # Split names of this dataset for fitting (linear head) and for evaluation.
    c.train_split = info.train_split
    c.val_split = info.val_split
    # COCO only: the reference's random subset of train2017 (fraction, Python `random` seed).
    c.coco_train_fraction = datasets.COCO_TRAIN_FRACTION
    c.coco_seed = datasets.COCO_SEED
    # Backbone: anything neco_jax.load_backbone accepts (pretrained name, .pth/.safetensors file, saved folder),
    # or a training workdir; `arch` overrides the architecture guess (empty: let load_backbone decide).
    c.checkpoint = ""
    c.arch = ""
    # For a training workdir: which of its models to evaluate, "teacher" or "student".
    c.checkpoint_model = "teacher"
    # Output folder: results.json, results.txt and PNGs go here.
    c.workdir = ""
    # Square input resolution of the backbone (Resize((448, 448)), no crop) and the evaluation mask size.
    c.image_size = 448
    c.mask_size = 100
    # Backbone compute dtype, "float32" or "bfloat16" (parameters, LayerNorm and softmax stay fp32).
    c.dtype = "float32"
    # Images per feature-extraction batch (padded to a multiple of the device count) and decoding threads.
    c.batch_size = 64
    c.num_threads = 8
    # Use only the first N images of each split (0 = all); for smoke runs.
    c.num_images = 0
    # Number of validation images drawn as PNGs (image, ground truth, prediction, PCA of features).
    c.num_visualize = 8
    # Fixed by the dataset (evaluation.datasets.DATASETS, which its reader returns too); not to be overridden.
    c.num_classes = info.num_classes
    return c


def linear_fields(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Linear segmentation (NeCo linear_finetune.py + eval_linear.py): `evaluation.linear.LinearSettings`."""
    c.linear = config_section(linear.LinearSettings())
    return c


def overcluster_fields(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Overclustering (NeCo eval_overcluster.py): `evaluation.overcluster.OverclusterSettings`, and
    drop_remainder: keep only a multiple of this many images (the reference VOC loader's drop_last with batch 32;
    0 = all)."""
    defaults = overcluster.OverclusterSettings(ks=overcluster.default_ks(c.num_classes))
    c.overcluster = config_section(defaults, drop_remainder=0)
    return c
