"""Overclustering on Cityscapes fine (train / val; labelIds mapped to 19 train ids, ignore 255).

python -m evaluation --config=configs/eval/cityscapes_overcluster.py --config.checkpoint=SOURCE --config.data_dir=DIR --config.workdir=OUT
"""

from configs.eval import base


def get_config():
    return base.get_eval_config("cityscapes", "overcluster")
