"""Values shared by every NeCo recipe (docs/method.md): the training settings' defaults (neco_jax/settings.py,
where each field is documented with its allowed values), and the original's ablations.

A recipe file calls `base.get_config()` and overrides the few fields of its row of the results table.
Ablations of the original (`experiments/configs/ablations/*`) are named presets, reachable as the config
argument of any recipe (`--config=configs/dinov2_s14.py:odd_even`) or field by field with overrides
(`--config.loss.sort_net=odd_even`).
"""

import ml_collections

from neco_jax import settings
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
    """The DINOv2 ViT-S/14 recipe (`models/small/neco_dinov2.yml`), which every other recipe edits: the defaults
    of the training settings, each documented where it is defined (neco_jax/settings.py)."""
    return settings.to_config()


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
