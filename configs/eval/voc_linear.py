"""Linear segmentation on Pascal VOC 2012 (data_dir/VOCSegmentation; train = trainaug 10,582, val 1,449; 21 classes, ignore 255).

python -m evaluation --config=configs/eval/voc_linear.py --config.checkpoint=SOURCE --config.data_dir=DIR --config.workdir=OUT
"""

from configs.eval import base


def get_config():
    # With linear.select_best, the reference VOC val loader also drops its last partial batch (1,408 of 1,449).
    return base.get_eval_config("voc", "linear", select_drop_last=True)
