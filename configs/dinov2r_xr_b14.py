"""NeCo recipe: DINOv2R-XR ViT-B/14 (`models/base/neco_dinov2r_xr.yml`).

Register weights, 0 registers, batch 16, lr_backbone 1e-6."""

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The recipe; `arg` names an ablation preset of configs/base.py (or is empty)."""
    c = base.get_config()
    c.model.arch = "vit_base_patch14_dinov2"
    c.model.init = "dinov2_vitb14_reg"
    c.model.num_register_tokens = 0
    c.optim.batch_size = 16
    c.optim.lr_backbone = 1e-6
    return base.apply_arg(c, arg)
