"""CPU demo: a tiny random-init ViT post-trained with NeCo on the bundled sample photos.

    python main.py --config=configs/demo.py --workdir=runs/demo

40 steps on 2 CPU cores in well under a minute; writes checkpoints, metrics.jsonl and the exported
student/teacher backbones (PyTorch files under workdir/export). Everything else is the DINOv2 ViT-S/14
recipe: the same loss, queue, schedules and EMA, only smaller.
"""

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The demo; `arg` names an ablation preset of configs/base.py (or is empty)."""
    c = base.get_config()
    c.model.arch = "vit_tiny_test"  # patch 14, dim 64, 2 blocks, 2 heads
    c.model.init = "random"
    c.head.hidden_dim = 128
    c.head.out_dim = 64
    c.data.dataset_name = "sample"  # the bundled sample photos
    c.data.size_crops = (56, 28)  # 4x4 global and 2x2 local token grids
    c.data.num_workers = 0
    c.optim.batch_size = 4
    c.optim.total_steps = 40
    c.optim.lr_backbone = 5e-4
    c.optim.lr_heads = 1e-3
    c.loss.queue_length = 512
    # Overlaps are aligned onto the global crop's own 4x4 token grid: 16 references sorted per query patch. The
    # recipes' 7x7 grid is coarser than their 16x16 to 37x37 token grids; here it would resample 16 tokens into 49
    # cells, and its sorts (49 wires, 21 layers) took 0.5 s of a 0.55 s step on 2 CPU cores (0.05 s with this grid).
    c.loss.roi_align_kernel_size = 4
    c.log_every_steps = 5
    c.checkpoint_every_steps = 20
    c.keep_checkpoints = 2
    return base.apply_arg(c, arg)
