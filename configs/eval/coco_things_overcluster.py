"""Overclustering on COCO-Things (12 thing supercategories; train = the seeded random 10% of train2017, val = val2017; ignore 255).

python -m evaluation --config=configs/eval/coco_things_overcluster.py --config.checkpoint=SOURCE --config.data_dir=DIR --config.workdir=OUT
"""

from configs.eval import base


def get_config():
    return base.get_eval_config("coco_things", "overcluster")
