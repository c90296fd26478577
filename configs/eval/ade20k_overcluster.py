"""Overclustering on ADE20k SceneParse150 (training / validation; 151 labels, 0 ignored but counted in the mean).

python -m evaluation --config=configs/eval/ade20k_overcluster.py --config.checkpoint=SOURCE --config.data_dir=DIR --config.workdir=OUT
"""

from configs.eval import base


def get_config():
    return base.get_eval_config("ade20k", "overcluster")
