"""Shared fields of every evaluation job; `configs/eval/<dataset>_<protocol>.py` call `get_eval_config`.

Values are the reference protocols' (reference/evaluation_protocols.md sections 2 and 6). The returned config
is locked: overriding a field that does not exist (`--config.typo=1`) is an error.
"""

import ml_collections

# dataset -> (train split, val split, number of classes, ignore index) as the readers name them.
DATASETS = {
    "voc": ("trainaug", "val", 21, 255),
    "coco_things": ("train", "val", 12, 255),
    "coco_stuff": ("train", "val", 15, 255),
    "ade20k": ("training", "validation", 151, 0),
    "cityscapes": ("train", "val", 19, 255),
}


def get_eval_config(dataset: str, protocol: str, **protocol_overrides) -> ml_collections.ConfigDict:
    """The locked config of `protocol` on `dataset`; `protocol_overrides` change protocol fields' defaults."""
    c = common_fields(dataset, protocol)
    {"linear": linear_fields, "overcluster": overcluster_fields}[protocol](c)
    getattr(c, protocol).update(protocol_overrides)
    c.lock()
    return c


def common_fields(dataset: str, protocol: str) -> ml_collections.ConfigDict:
    """Fields every evaluation job has (unlocked, so a protocol file can add its own section)."""
    train_split, val_split, num_classes, _ = DATASETS[dataset]
    c = ml_collections.ConfigDict()
    # Which evaluation: the module evaluation.<protocol> runs it.
    c.protocol = protocol
    # Dataset reader name (evaluation.datasets.open_dataset) and its folder (layouts in evaluation/datasets.py).
    c.dataset = dataset
    c.data_dir = ""
    # Split names of this dataset for fitting (linear head) and for evaluation.
    c.train_split = train_split
    c.val_split = val_split
    # COCO only: the reference's random subset of train2017 (fraction, Python `random` seed).
    c.coco_train_fraction = 0.1
    c.coco_seed = 400
    # Backbone: anything neco_jax.load_backbone accepts (pretrained name, .pth/.safetensors file, saved folder),
    # or a training workdir; `arch` overrides the architecture guess (empty: let load_backbone decide).
    c.checkpoint = ""
    c.arch = ""
    # For a training workdir: which of its models to evaluate, "teacher" or "student".
    c.checkpoint_model = "teacher"
    # Output folder: results.json, results.txt and PNGs go here.
    c.workdir = ""
    # Square input resolution of the backbone (Resize((448, 448)), no crop) and the evaluation mask size.
    c.image_size = 448
    c.mask_size = 100
    # Backbone compute dtype, "float32" or "bfloat16" (parameters, LayerNorm and softmax stay fp32).
    c.dtype = "float32"
    # Images per feature-extraction batch (padded to a multiple of the device count) and decoding threads.
    c.batch_size = 64
    c.num_threads = 8
    # Use only the first N images of each split (0 = all); for smoke runs.
    c.num_images = 0
    # Number of validation images drawn as PNGs (image, ground truth, prediction, PCA of features).
    c.num_visualize = 8
    # Fixed by the dataset; listed for reference (the reader's own count is what is used).
    c.num_classes = num_classes
    return c


def linear_fields(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Linear segmentation (Leopart/NeCo linear_finetune.py + eval_linear.py)."""
    c.linear = ml_collections.ConfigDict()
    lin = c.linear
    # SGD on the 1x1 head: lr, momentum, weight decay (added to the gradient, as torch.optim.SGD).
    lin.lr = 0.01
    lin.momentum = 0.9
    lin.weight_decay = 1e-4
    # Epochs, and StepLR: lr x lr_gamma every lr_step_epochs epochs.
    lin.epochs = 25
    lin.lr_step_epochs = 20
    lin.lr_gamma = 0.1
    # Head batch size, and whether the last partial batch of an epoch is dropped (the reference VOC and COCO
    # loaders drop it, its ADE20k and Cityscapes loaders keep it).
    lin.batch_size = 128
    lin.drop_last = True
    # Shuffle the training set each epoch (the reference VOC and ADE20k loaders do not; COCO's does).
    lin.shuffle = False
    # Paired RandomResizedCrop(image_size, scale) and horizontal flip with probability hflip.
    lin.crop_scale = (0.8, 1.0)
    lin.hflip = 0.5
    # Training loss resolution (features bilinearly upsampled, masks nearest) and final evaluation resolution.
    lin.train_mask_size = 100
    lin.eval_mask_size = 448
    # Compute backbone features once (no augmentation then) instead of on every augmented batch.
    lin.cache_features = False
    # Seed of the head init, crops, flips and shuffling (the reference seeds 400).
    lin.seed = 400
    # Which head is scored: False = the last epoch's; True = the epoch with the best val mIoU measured after every
    # epoch at select_mask_size, as the reference's ModelCheckpoint(monitor="miou_val") keeps it (this selects on
    # the evaluation set). select_drop_last scores only whole batches of val images (the reference VOC loader).
    lin.select_best = False
    lin.select_mask_size = 100
    lin.select_drop_last = False
    return c


def overcluster_fields(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Overclustering (NeCo eval_overcluster.py): standardise, PCA, k-means on the val features themselves."""
    c.overcluster = ml_collections.ConfigDict()
    oc = c.overcluster
    # Cluster counts; K == num_classes uses Hungarian matching, larger K many-to-one by precision.
    oc.ks = (c.num_classes, 300, 500)
    # k-means seeds (results averaged), restarts per seed (best objective kept), Lloyd iterations.
    oc.seeds = (0, 1, 2, 3, 4)
    oc.restarts = 5
    oc.iters = 100
    # Centroid init: "random" (distinct random points, as faiss) or "kmeans++".
    oc.init = "random"
    # PCA target dimension, and faiss's training subsample: at most max_points_per_dim * D vectors (0 = all).
    oc.pca_dim = 50
    oc.pca_max_points_per_dim = 1000
    # faiss's k-means training subsample: at most max_points_per_centroid * K points (0 = all points).
    oc.max_points_per_centroid = 256
    # Keep only a multiple of this many images (the reference VOC loader's drop_last with batch 32; 0 = all).
    oc.drop_remainder = 0
    return c
