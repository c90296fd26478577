"""Linear segmentation on COCO-Stuff (15 stuff supercategories; train = the seeded random 10% of train2017, val = val2017; ignore 255).

python -m evaluation --config=configs/eval/coco_stuff_linear.py --config.checkpoint=SOURCE --config.data_dir=DIR --config.workdir=OUT
"""

from configs.eval import base


def get_config():
    # The reference COCO train loader shuffles.
    return base.get_eval_config("coco_stuff", "linear", shuffle=True)
