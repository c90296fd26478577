"""Training configs shared by the tests that run the trainer."""

import ml_collections
import pytest

from configs import base, demo
from neco_jax import settings

# One recipe per row of the NeCo README's results table, then the demo.
RECIPES = (*base.RECIPES, "demo")


def tiny_config(**fields) -> ml_collections.ConfigDict:
    """The demo recipe, made smaller for tests: 4 images of 56/28 px, a 2-block 64-dim ViT, metrics every
    step, no periodic checkpoints or export; `fields` are dotted overrides (`base.set_fields`)."""
    c = demo.get_config()
    c.checkpoint_every_steps = 1000
    c.log_every_steps = 1
    c.export_at_end = False
    return base.set_fields(c, fields)


def tiny_settings(**fields) -> settings.TrainSettings:
    """`tiny_config(**fields)` as the trainer reads it."""
    return settings.from_config(tiny_config(**fields))


# Tests that compile the same training step share it through the session's compilation cache, but only when
# they run one after the other: each group goes to one pytest-xdist worker (`--dist loadgroup`, tests/run.sh).
# Learning rates, weight decay, momentum and run length are arguments of the step (neco_jax/step.py), and the
# non-finite steps that stop a run a value it carries, so configs that differ only in those, or in what the host
# does around the step, share a program.
SAME_STEP_DEMO = pytest.mark.xdist_group("demo")  # the demo's loop step on 4 devices: main.py and tiny_config runs
SAME_STEP_RECIPES = pytest.mark.xdist_group("recipes")  # several recipes compile to one program at reduced shapes
