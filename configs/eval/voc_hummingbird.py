"""Dense NN retrieval (Hummingbird) on Pascal VOC 2012: memory from trainaug (10,582, or a 1/n list), val 1,449.

python -m evaluation --config=configs/eval/voc_hummingbird.py --config.checkpoint=SOURCE --config.data_dir=DIR \
    --config.workdir=OUT [--config.hummingbird.fraction=8 --config.hummingbird.fraction_seed=42]

The protocol's fields and defaults are `evaluation.hummingbird.RetrievalSettings` (open-hummingbird-eval 2.0's
values with the paper's memory of 10,240,000 patches). `hummingbird_fields` is shared with ade20k_hummingbird.py.
"""

import ml_collections

from configs.eval import base
from evaluation.hummingbird import TOP_LEVEL, RetrievalSettings
from evaluation.settings import config_section


def hummingbird_fields(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds `c.hummingbird` and sets the retrieval input size and batch size at the top level."""
    defaults = RetrievalSettings()
    c.image_size = defaults.input_size
    c.mask_size = defaults.input_size  # predictions and masks are compared at the input size
    c.batch_size = defaults.batch_size
    # Job-only fields: 1/n of the train set: 1 (all), 8, 64 or 128, read from the released lists
    # <file_sets_dir>/<dataset>/1_div_<n>/<split>_<n>_<seed>.txt (open-hummingbird-eval's file_sets/);
    # file_sets_dir defaults to <data_dir>/file_sets. Seeds of the released lists: 42, 400, 783, 1293, 4019.
    c.hummingbird = config_section(defaults, exclude=TOP_LEVEL, fraction=1, fraction_seed=42, file_sets_dir="")
    return c


def hummingbird_config(dataset: str) -> ml_collections.ConfigDict:
    c = base.common_fields(dataset, "hummingbird")
    hummingbird_fields(c)
    c.lock()
    return c


def get_config():
    return hummingbird_config("voc")
