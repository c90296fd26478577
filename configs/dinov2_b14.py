"""NeCo recipe: DINOv2 ViT-B/14 (`models/base/neco_dinov2.yml`): batch 16, lr_backbone 5e-6."""

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The recipe; `arg` names an ablation preset of configs/base.py (or is empty)."""
    c = base.get_config()
    c.model.arch = "vit_base_patch14_dinov2"
    c.model.init = "dinov2_vitb14"
    c.optim.batch_size = 16
    c.optim.lr_backbone = 5e-6
    return base.apply_arg(c, arg)
