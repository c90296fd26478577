"""NeCo recipe: DINO ViT-S/16 (`models/small/neco_dino.yml`)."""

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The recipe; `arg` names an ablation preset of configs/base.py (or is empty)."""
    return base.apply_arg(base.dino_s16(base.get_config(), init="dino_vits16"), arg)
