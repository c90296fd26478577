"""NeCo recipe: DINOv2 ViT-S/14 (`models/small/neco_dinov2.yml`): the base values unchanged."""

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The recipe; `arg` names an ablation preset of configs/base.py (or is empty)."""
    c = base.get_config()
    return base.apply_arg(c, arg)
