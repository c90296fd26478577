"""Values shared by every NeCo recipe (docs/method.md), each field documented where it is set.

A recipe file calls `base.get_config()` and overrides the few fields of its row of the results table.
Ablations of the original (`experiments/configs/ablations/*`) are named presets, reachable as the config
argument of any recipe (`--config=configs/dinov2_s14.py:odd_even`) or field by field with overrides
(`--config.loss.sort_net=odd_even`).
"""

import ml_collections

from neco_jax.errors import ConfigError

# The recipe files, one per row of the original README's results table (configs/<name>.py).
RECIPES = (
    "dinov2_s14",
    "dinov2r_s14",
    "dinov2r_xr_s14",
    "dinov2_b14",
    "dinov2r_b14",
    "dinov2r_xr_b14",
    "dino_s16",
    "timet_s16",
    "leopart_s16",
)


def get_config() -> ml_collections.ConfigDict:
    """The DINOv2 ViT-S/14 recipe (`models/small/neco_dinov2.yml`), which every other recipe edits."""
    c = ml_collections.ConfigDict()
    c.seed = 400  # the original's `--seed` default (seed_everything(400)).

    c.model = ml_collections.ConfigDict()
    c.model.arch = "vit_small_patch14_dinov2"  # neco_jax.models.get_arch name.
    # Initial backbone weights for student and teacher: a known pretrained name, a local .pth/.pt/.ckpt/
    # .safetensors file or a folder written by neco_jax.save_backbone, or "random" (tests, demo).
    c.model.init = "dinov2_vits14"
    # ViTConfig fields replaced on top of the named arch, e.g. {"depth": 1} for smoke tests with random init.
    c.model.arch_overrides = ml_collections.ConfigDict()
    c.model.num_register_tokens = 0  # 4 = DINOv2R; 0 with register weights = "XR" (registers dropped).
    c.model.drop_path_rate = 0.1  # student only (linear per-block schedule); the teacher uses 0.
    c.model.dtype = "float32"  # compute dtype of the backbone matmuls ("bfloat16" on GPUs); params stay fp32.
    # Rematerialisation of the ViT blocks in the backward pass (neco_jax/memory_fit.py): "auto" compiles the step
    # ahead and takes the cheapest of "none", "dots" (keep the matmul outputs, recompute the elementwise work) and
    # "full" (keep nothing: about one more forward pass) that fits the device's memory; or one of those three.
    c.model.remat = "auto"
    # Softmax attention (neco_jax/models/attention.py): "auto" keeps no N x N scores for the backward pass on
    # accelerators (cuDNN flash attention for bfloat16 on GPUs, else an exact chunked JAX attention; XLA's plain
    # path on the CPU at small sizes); or "xla", "chunked", "cudnn". The same numbers to rounding.
    c.model.attention = "auto"

    c.head = ml_collections.ConfigDict()
    c.head.hidden_dim = 2048  # projection_hidden_dim
    c.head.out_dim = 256  # projection_feat_dim
    c.head.num_layers = 3  # n_layers_projection_head

    c.data = ml_collections.ConfigDict()
    # Training images: "coco" (every file of data_dir/train2017), "voc", "imagenet100k", ... (input_pipeline.sources),
    # or "sample": the 9 bundled photos (the CPU demo).
    c.data.dataset_name = "coco"
    c.data.data_dir = ""  # root folder of the training images: required, except for dataset_name "sample".
    c.data.size_crops = (518, 98)  # global / local crop side in pixels.
    c.data.nmb_samples = (2, 4)  # number of global / local crops per image.
    c.data.min_scale_crops = (0.25, 0.05)  # RandomResizedCrop min area fraction (global, local).
    c.data.max_scale_crops = (1.0, 0.25)  # RandomResizedCrop max area fraction (global, local).
    c.data.min_intersection_crops = 0.01  # min crop overlap as a fraction of the image area (x2 between globals).
    c.data.jitter_strength = 1.0  # ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) with p=0.8.
    c.data.blur_strength = 1.0  # Gaussian blur sigma range [0.1s, 2s] with p=0.5.
    c.data.num_workers = 8  # decode/augment worker processes per host (the original used 20).
    c.data.jitter_prob = 0.8  # probability of the colour jitter.
    c.data.grayscale_prob = 0.2  # probability of grayscale.
    c.data.blur_prob = 0.5  # probability of the Gaussian blur.
    c.data.augment_on = "device"  # colour jitter/grayscale/blur in the train step ("device") or with PIL ("host").
    c.data.augment_numerics = "pil"  # device ops: PIL's uint8 rounding between ops (the original's) or "tensor".
    c.data.max_resample_tries = 100  # overlap-rule redraws before the overlapping-by-construction fallback.
    c.data.exif_transpose = True  # apply EXIF orientation (False: the original, which ignores it).
    c.data.max_bad_fraction = 0.01  # stop when more than this share of the files read is unreadable.
    c.data.tfds_split = "train"  # for dataset_name "tfds:NAME": the split ...
    c.data.tfds_image_key = "image"  # ... and the image feature to read.

    c.optim = ml_collections.ConfigDict()
    c.optim.batch_size = 64  # global batch (the original: per GPU, on one GPU).
    c.optim.num_epochs = 25  # max_epochs
    # 0: num_epochs * (dataset size // batch_size), the original's drop_last epochs; > 0 overrides (demo, tests).
    c.optim.total_steps = 0
    c.optim.lr_backbone = 1e-5  # AdamW lr of the backbone groups, decayed by a cosine without warmup.
    c.optim.lr_heads = 1e-4  # AdamW lr of the projection-head groups.
    c.optim.final_lr = 0.0  # cosine floor of both learning rates (CosineAnnealingLR eta_min).
    c.optim.weight_decay = 0.04  # weight decay at step 0 of the decayed groups ...
    c.optim.weight_decay_end = 0.5  # ... rising along a cosine towards this value.
    c.optim.exclude_norm_bias = True  # no decay on biases and 1-D params (norms, LayerScale gammas).
    c.optim.grad_clip_norm = 0.0  # > 0: clip the global gradient norm of the trained params (the original's is inert).
    # Blocks to train (others and the embeddings/final norm frozen): "" = all params; "-n" = last n blocks;
    # "n" = blocks n onwards; "i,j,k" = those blocks. The head always trains.
    c.optim.trainable_blocks = ""
    c.optim.on_nonfinite = "error"  # "error": stop naming the step; "skip": drop the update and count it ...
    c.optim.max_consecutive_skips = 10  # ... and stop with the error after this many non-finite steps in a row.

    c.ema = ml_collections.ConfigDict()
    c.ema.momentum = 0.9995  # momentum_teacher at step 0 ...
    c.ema.momentum_end = 1.0  # ... rising along a cosine (never reached: the schedule stops one step short).

    c.loss = ml_collections.ConfigDict()
    c.loss.use_teacher = True  # False: the student (a second forward pass) is its own teacher.
    c.loss.roi_align_kernel_size = 7  # 7x7 aligned grid: 49 reference patches and 49-element sorts.
    c.loss.student_steepness = 100.0  # diffsort steepness of the student sorter.
    c.loss.teacher_steepness = 100.0  # diffsort steepness of the teacher sorter.
    c.loss.sort_net = "bitonic"  # "bitonic" or "odd_even".
    c.loss.distribution = "cauchy"  # diffsort relaxation (DiffSortNet default).
    c.loss.sim_dist = "cosine"  # "cosine" or "euclidean".
    c.loss.loss_mask = "all"  # "all", or "fg"/"bg": patches inside/outside the teacher's attention mask.
    c.loss.use_queue = True  # True: references from a FIFO queue of teacher vectors; False: the batch pool.
    c.loss.queue_length = 8192  # per anchor crop (the original divides it by the number of GPUs: one here).
    # False: sample references from each queue's filled part only. True: the original's shared fill counter,
    # bumped once per anchor crop (twice per step), so early steps also draw never-written zero slots
    # (`update_queue` in vpariza/NeCo src/neco.py); for side-by-side comparisons with the original's first ~12 steps.
    c.loss.queue_original_counter = False
    c.loss.crops_for_assign = (0, 1)  # global crops used as teacher anchors.

    # Evaluation during training, as the original validates every epoch: every `every_epochs` epochs (0 = never,
    # the default, which costs nothing) run the evaluation job `config` (a configs/eval/*.py file) on the current
    # teacher with the data in `data_dir`; eval_miou goes to metrics.jsonl, results to workdir/eval/epoch_<e>/.
    # `set` overrides job fields, ";"-separated: "image_size=224;overcluster.ks=(21, 300)".
    c.eval = ml_collections.ConfigDict()
    c.eval.every_epochs = 0
    c.eval.config = "configs/eval/voc_overcluster.py"
    c.eval.data_dir = ""
    c.eval.set = ""

    c.log_every_steps = 50  # metrics to metrics.jsonl and the console.
    c.checkpoint_every_steps = 1000  # asynchronous orbax checkpoint period.
    c.keep_checkpoints = 3  # keep the newest N checkpoints.
    # Several processes (neco_jax/distributed.py): seconds for all of them to reach the coordinator at start,
    # and steps between their exchanges of stop requests (a SIGTERM to any one stops all at the same step).
    c.init_timeout_s = 300
    c.stop_check_every_steps = 10
    c.export_at_end = True  # write student and teacher backbones in PyTorch layout under workdir/export.
    return c


def dino_s16(c: ml_collections.ConfigDict, init: str) -> ml_collections.ConfigDict:
    """The DINO-architecture recipes (`models/small/neco_{dino,timetuning,leopart}.yml`).

    ViT-S/16 in the timm layout, 224/98-px crops, batch 45, 50 epochs, batch-pool references (no queue key).
    """
    c.model.arch = "vit_small_patch16_dino"
    c.model.init = init
    c.data.size_crops = (224, 98)
    c.optim.batch_size = 45
    c.optim.num_epochs = 50
    c.loss.use_queue = False
    return c


# The original's ablations (experiments/configs/ablations/*) start from the 224-px setup with register
# weights and no registers, batch 55, 50 epochs, lr_backbone 1e-6 and batch-pool references.
_ABLATION_BASE = {
    "data.size_crops": (224, 98),
    "optim.batch_size": 55,
    "optim.num_epochs": 50,
    "optim.lr_backbone": 1e-6,
    "loss.use_queue": False,
    "model.num_register_tokens": 0,
}
_VOC = {"data.dataset_name": "voc"}  # VOC trainaug
ABLATIONS = {
    **{
        f"steepness_{s}_{t}": {"loss.student_steepness": float(s), "loss.teacher_steepness": float(t)}
        for s, t in ((10, 100), (10, 1000), (100, 100), (100, 1000), (1000, 1000))
    },
    "odd_even": {"loss.sort_net": "odd_even"},
    "fg": {"loss.sort_net": "odd_even", "loss.loss_mask": "fg", **_VOC},
    "bg": {"loss.sort_net": "odd_even", "loss.loss_mask": "bg", **_VOC},
    "no_teacher": {"loss.sort_net": "odd_even", "loss.use_teacher": False, **_VOC},
    "voc": {"loss.sort_net": "odd_even", **_VOC},
    "in100": {"loss.sort_net": "odd_even", "data.dataset_name": "imagenet100k"},
}


def set_fields(config: ml_collections.ConfigDict, values: dict) -> ml_collections.ConfigDict:
    """Sets dotted fields ("optim.batch_size") on config; a name the config lacks is an error."""
    for dotted, value in values.items():
        *parents, leaf = dotted.split(".")
        node = config
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise KeyError(f"config has no field {dotted!r}")
        node[leaf] = value
    return config


def apply_arg(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Applies the config-file argument: "" for the recipe itself, or an ablation preset name.

    An ablation keeps the recipe's backbone but switches to the original ablation setup
    (_ABLATION_BASE) plus the preset's own fields.
    """
    if not arg:
        return config
    if arg not in ABLATIONS:
        raise ConfigError(f"unknown config argument {arg!r}; choose one of {', '.join(sorted(ABLATIONS))}")
    set_fields(config, _ABLATION_BASE)
    return set_fields(config, ABLATIONS[arg])
