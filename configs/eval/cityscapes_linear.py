"""Linear segmentation on Cityscapes fine (train / val; labelIds mapped to 19 train ids, ignore 255).

python -m evaluation --config=configs/eval/cityscapes_linear.py --config.checkpoint=SOURCE --config.data_dir=DIR --config.workdir=OUT
"""

from configs.eval import base


def get_config():
    # The reference Cityscapes train loader keeps the last partial batch (drop_last=False) and shuffles
    # (NeCo experiments/linear_segmentation/linear_finetune.py builds CityscapesDataModule with shuffle=True).
    return base.get_eval_config("cityscapes", "linear", drop_last=False, shuffle=True)
