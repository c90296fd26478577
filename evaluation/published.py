"""Published numbers that ``evaluation.suite`` puts beside a checkpoint's own.

Source: the results table of NeCo's README (https://github.com/vpariza/NeCo, README.md, "Below is a table with
some of our results on Pascal VOC 2012"), one row per released checkpoint, Pascal VOC mIoU in percent:
overclustering with K=500, dense NN retrieval (Hummingbird, full memory) and linear segmentation. The README
labels the DINOv2R ViT-B/14 row "ViT-S/14"; its 85M parameters and download folder (vit-base) make it B/14.
Rows are keyed by the checkpoint names of ``neco_jax.pretrained``.
"""

from __future__ import annotations

SOURCE = "NeCo README results table (github.com/vpariza/NeCo, README.md), Pascal VOC 2012 mIoU %"

# What each column measures: (protocol, dataset, metric key in that protocol's results, label).
COLUMNS = {
    "overcluster_k500": ("overcluster", "voc", "miou_k500", "overclustering K=500"),
    "dense_nn": ("hummingbird", "voc", "miou", "dense NN retrieval"),
    "linear": ("linear", "voc", "miou", "linear"),
}

# name -> (backbone, architecture, {column: mIoU %}).
NECO_README = {
    "neco_dinov2_vits14": ("DINOv2", "ViT-S/14", {"overcluster_k500": 57.7, "dense_nn": 78.6, "linear": 81.4}),
    "neco_dinov2r_xr_vits14": ("DINOv2R-XR", "ViT-S/14", {"overcluster_k500": 72.6, "dense_nn": 80.2, "linear": 81.3}),
    "neco_dinov2r_vits14": ("DINOv2R", "ViT-S/14", {"overcluster_k500": 68.9, "dense_nn": 80.7, "linear": 81.5}),
    "neco_dinov2_vitb14": ("DINOv2", "ViT-B/14", {"overcluster_k500": 71.1, "dense_nn": 82.8, "linear": 84.5}),
    "neco_dinov2r_xr_vitb14": ("DINOv2R-XR", "ViT-B/14", {"overcluster_k500": 71.8, "dense_nn": 83.5, "linear": 83.3}),
    "neco_dinov2r_vitb14": ("DINOv2R", "ViT-B/14", {"overcluster_k500": 71.9, "dense_nn": 82.9, "linear": 84.4}),
    "neco_dino_vits16": ("DINO", "ViT-S/16", {"overcluster_k500": 47.9, "dense_nn": 61.3, "linear": 65.8}),
    "neco_timetuning_vits16": ("TimeT", "ViT-S/16", {"overcluster_k500": 53.1, "dense_nn": 66.5, "linear": 68.5}),
    "neco_leopart_vits16": ("Leopart", "ViT-S/16", {"overcluster_k500": 55.3, "dense_nn": 66.2, "linear": 68.3}),
}


def paper_value(row: str, protocol: str, dataset: str, metric: str) -> float | None:
    """The row's published mIoU (a fraction) for one protocol result, or None where the table has none."""
    if row not in NECO_README:
        return None
    values = NECO_README[row][2]
    for column, (p, d, m, _) in COLUMNS.items():
        if (p, d, m) == (protocol, dataset, metric) and column in values:
            return values[column] / 100
    return None


def row_for(checkpoint: str, *, patch_size: int, embed_dim: int, registers: int) -> tuple[str | None, str]:
    """The table row matching a checkpoint, and why: its pretrained name when it is one of the released
    checkpoints, else a guess from the architecture (DINOv2 with or without registers at /14, DINO at /16)."""
    stem = checkpoint.rstrip("/").rsplit("/", 1)[-1].split(".")[0]
    name = stem.removesuffix("_teacher")
    if name in NECO_README:
        return name, f"the released checkpoint {name}"
    size = {384: "s", 768: "b"}.get(embed_dim)
    if size is None:
        return None, f"no published row for width {embed_dim}"
    if patch_size == 14:
        row = f"neco_dinov2r_vit{size}14" if registers else f"neco_dinov2_vit{size}14"
        note = " (the R-XR rows also have no registers; pass --paper_row to pick one)" if not registers else ""
        return row, f"guessed from the architecture (/{patch_size}, width {embed_dim}, {registers} registers){note}"
    if patch_size == 16 and size == "s":
        return "neco_dino_vits16", "guessed from the architecture (ViT-S/16: the DINO row; TimeT and Leopart share it)"
    return None, f"no published row for patch size {patch_size} and width {embed_dim}"
