"""NeCo recipe: TimeT ViT-S/16 (`models/small/neco_timetuning.yml`); initialise from your TimeT checkpoint:
`--config.model.init=/path/to/timetuning_vits16.pth`."""

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The recipe; `arg` names an ablation preset of configs/base.py (or is empty)."""
    return base.apply_arg(base.dino_s16(base.get_config(), init=""), arg)
