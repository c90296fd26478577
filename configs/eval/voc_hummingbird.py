"""Dense NN retrieval (Hummingbird) on Pascal VOC 2012: memory from trainaug (10,582, or a 1/n list), val 1,449.

python -m evaluation --config=configs/eval/voc_hummingbird.py --config.checkpoint=SOURCE --config.data_dir=DIR \
    --config.workdir=OUT [--config.hummingbird.fraction=8 --config.hummingbird.fraction_seed=42]

Values are open-hummingbird-eval 2.0's with the paper's memory of 10,240,000 patches
(reference/evaluation_protocols.md section 1). `hummingbird_fields` is shared with ade20k_hummingbird.py.
"""

import ml_collections

from configs.eval import base


def hummingbird_fields(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds `c.hummingbird` and sets the retrieval input size (504 = 36 x 14; use 512 for /16 backbones)."""
    c.image_size = 504
    c.mask_size = 504  # predictions and masks are compared at the input size
    c.batch_size = 16
    h = c.hummingbird = ml_collections.ConfigDict()
    # Neighbours per query and the softmax temperature of the label transfer.
    h.k = 30
    h.temperature = 0.02
    # Augmented passes over the train images (the reference's augmentation_epoch).
    h.passes = 2
    # Memory patches in total (each image keeps memory_size // (images * passes)); 0 = every patch. When the
    # per-image share reaches the patches per image (small fractions), every patch is kept.
    h.memory_size = 10_240_000
    # 1/n of the train set: 1 (all), 8, 64 or 128, read from the released lists
    # <file_sets_dir>/<dataset>/1_div_<n>/<split>_<n>_<seed>.txt (open-hummingbird-eval's file_sets/);
    # file_sets_dir defaults to <data_dir>/file_sets. Seeds of the released lists: 42, 400, 783, 1293, 4019.
    h.fraction = 1
    h.fraction_seed = 42
    h.file_sets_dir = ""
    # The reference normalises with std (0.229, 0.224, 0.255), a typo for 0.225. Off: 0.225 (ImageNet's value).
    # On: the typo, to compare with published numbers.
    h.reproduce_std_typo = False
    # Colour-jitter range of brightness, contrast, saturation and hue on memory images (0 = none).
    h.jitter = 0.1
    # Search precision: keys/queries stored and multiplied in search_dtype, scores ranked in topk_dtype
    # ("float32" or "bfloat16"); neighbour weights always use fp32 cosines.
    h.search_dtype = "bfloat16"
    h.topk_dtype = "float32"
    # Keys scored per step on each device (bounds device memory), and the bin-max prefilter, which is exact
    # (b > 0 ranks bins of b keys by their best score and selects only inside the best k bins; 0 = plain top-k
    # over every score; see evaluation/knn.py and bench/retrieval.py for the speed of each).
    h.memory_chunk = 65536
    h.bin_size = 128
    # Seed of the augmentation and of the patch selection.
    h.seed = 0
    return c


def hummingbird_config(dataset: str) -> ml_collections.ConfigDict:
    c = base.common_fields(dataset, "hummingbird")
    hummingbird_fields(c)
    c.lock()
    return c


def get_config():
    return hummingbird_config("voc")
