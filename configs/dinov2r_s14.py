"""NeCo recipe: DINOv2 with 4 registers, ViT-S/14 (`models/small/neco_dinov2r.yml`).

Register weights, registers kept."""

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The recipe; `arg` names an ablation preset of configs/base.py (or is empty)."""
    c = base.get_config()
    c.model.init = "dinov2_vits14_reg"
    c.model.num_register_tokens = 4
    return base.apply_arg(c, arg)
