"""NeCo recipe: DINOv2R-XR ViT-S/14 (`models/small/neco_dinov2r_xr.yml`).

Register weights, registers dropped (0 tokens).

The original's ablations use this backbone: `--config=configs/dinov2r_xr_s14.py:odd_even` etc."""

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The recipe; `arg` names an ablation preset of configs/base.py (or is empty)."""
    c = base.get_config()
    c.model.init = "dinov2_vits14_reg"
    c.model.num_register_tokens = 0
    return base.apply_arg(c, arg)
