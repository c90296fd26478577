"""The demo recipe at the smallest shapes that keep every part of the step, for the tests whose time is compiling
and running it (the multi-process runs, the planner's GPU and TPU compilations): a 1-block 32-dim ViT, 28/14-px
crops, a 2x2 aligned grid and a 32-entry queue, 6 steps, metrics every step, stop requests exchanged every step.
Used both in-process and as `--config=tests/smallest_config.py`."""

import ml_collections

from configs import base, demo


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = demo.get_config(arg)
    with c.unlocked():
        c.model.arch_overrides = {"depth": 1, "embed_dim": 32, "num_heads": 2}
    return base.set_fields(
        c,
        {
            "head.hidden_dim": 32,
            "head.out_dim": 16,
            "loss.queue_length": 32,
            "loss.roi_align_kernel_size": 2,
            "data.size_crops": (28, 14),
            "optim.total_steps": 6,
            "log_every_steps": 1,
            "checkpoint_every_steps": 1000,
            "stop_check_every_steps": 1,
        },
    )
