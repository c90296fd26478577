"""Fully unsupervised segmentation on Pascal VOC 2012: CBFE + community detection (Leopart's protocol, as NeCo).

python -m evaluation --config=configs/eval/voc_cbfe.py --config.checkpoint=SOURCE --config.data_dir=DIR \
    --config.workdir=OUT [--config.cbfe.k_community=149 --config.cbfe.markov_time=2 --config.cbfe.weight_threshold=0.09]

Without the three community-detection values it searches them first (Optuna TPE, as NeCo's script).

Features of VOC train (1,464) + val (1,449) at 448 px; evaluation at 100x100. The protocol's fields and defaults
are `evaluation.cbfe.CbfeSettings` (NeCo's experiments/fully_unsup_seg/fully_unsup_seg.py values). Writes
results.json / results.txt, cbfe/example_*.png (image, ground truth, matched segments, overlay) and, after a
search, cbfe/search_history.png.
"""

import ml_collections

from configs.eval import base
from evaluation.cbfe import TOP_LEVEL, CbfeSettings
from evaluation.settings import config_section


def cbfe_fields(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c.train_split = "train"  # VOC train (1,464 images), for the threshold choice and the co-occurrence graph
    defaults = CbfeSettings()
    c.image_size = defaults.image_size
    c.mask_size = defaults.eval_size
    c.batch_size = defaults.batch_size
    c.num_threads = defaults.num_threads
    # Job-only field: registers=False builds the model without register tokens, as NeCo's script does (True = the
    # model as loaded).
    c.cbfe = config_section(defaults, exclude=TOP_LEVEL, registers=True)
    return c


def get_config():
    c = base.common_fields("voc", "cbfe")
    cbfe_fields(c)
    c.lock()
    return c
