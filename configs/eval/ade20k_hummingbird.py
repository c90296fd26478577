"""Dense NN retrieval (Hummingbird) on ADE20k: memory from training (20,210, or a 1/n list), validation 2,000;
151 labels, 0 ignored by the metric but kept in the memory labels (as the reference).

python -m evaluation --config=configs/eval/ade20k_hummingbird.py --config.checkpoint=SOURCE --config.data_dir=DIR \
    --config.workdir=OUT [--config.hummingbird.fraction=8]
"""

from configs.eval.voc_hummingbird import hummingbird_config


def get_config():
    return hummingbird_config("ade20k")
