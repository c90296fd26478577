"""Model FLOPs of the ViT forward and of one NeCo training step (docs/flops.md), and bf16 peaks for MFU.

The analytic count is what MFU is defined on: matmul MACs of the backbone blocks (qkv, attention scores and
values, projection, MLP) and the patch embedding, plus the projection head; LayerNorm, softmax, GELU, the
sorting network and ROI-align are left out. `matmul_flops` counts the dot_general/conv FLOPs XLA would run
for any traced function (its jaxpr), so the tests can check the formula against the model's real code.
"""

from __future__ import annotations

from typing import Any

from neco_jax.flop_count import matmul_flops  # noqa: F401  (the bench's and the tests' name for it)

# Dense bf16 tensor-core peaks in TFLOP/s, matched against `device.device_kind` (first match wins).
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", None),  # a different part (835 TFLOP/s quoted), no data-sheet peak here: report n/a, don't guess
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("A100", 312.0),
)


def bf16_peak_flops(device_kind: str) -> float | None:
    """Peak dense bf16 FLOP/s of a device kind string, or None when the chip is not known."""
    for name, tflops in BF16_PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return None if tflops is None else tflops * 1e12
    return None


def vit_forward_macs(cfg: Any, height: int, width: int | None = None) -> float:
    """Backbone forward MACs for one image: per block 4*N*d^2 (qkv + proj) + FFN + 2*N^2*d (scores and values),
    with N = 1 + registers + patches, plus the patch embedding. The FFN is 2*N*d*h for the MLP and 3*N*d*h for
    SwiGLU (w12 makes two hidden halves, w3 maps back), h = `cfg.mlp_hidden_dim`."""
    width = height if width is None else width
    patches = (height // cfg.patch_size) * (width // cfg.patch_size)
    n, d, h = 1 + cfg.num_register_tokens + patches, cfg.embed_dim, cfg.mlp_hidden_dim
    ffn = (3 if cfg.ffn_layer == "swiglu" else 2) * n * d * h
    block = 4 * n * d * d + ffn + 2 * n * n * d
    return float(cfg.depth * block + patches * cfg.patch_size**2 * 3 * d)


def head_macs_per_token(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> float:
    """The projection head's Linear layers, in -> hidden (-> hidden)* -> out."""
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    return float(sum(a * b for a, b in zip(dims, dims[1:])))


def neco_image_flops(
    cfg: Any, head: dict, size_crops: tuple[int, int], nmb_samples: tuple[int, int], *, head_on_all_tokens: bool = False
) -> float:
    """Model FLOPs per image of one NeCo step (docs/flops.md): the student's forward and backward
    (3x forward) on every crop, the teacher's forward on the global crops (the no-teacher ablation's second
    student forward costs the same), the head on every patch token (the step's work; docs/flops.md's 158/523
    GFLOPs also put CLS and registers through the head: `head_on_all_tokens`).

    head: {"hidden_dim", "out_dim", "num_layers"} of the projection head."""
    head_tok = head_macs_per_token(cfg.embed_dim, head["hidden_dim"], head["out_dim"], head["num_layers"])
    extra_tokens = 1 + cfg.num_register_tokens if head_on_all_tokens else 0

    def crop(size: int) -> float:
        return vit_forward_macs(cfg, size) + ((size // cfg.patch_size) ** 2 + extra_tokens) * head_tok

    (n_global, n_local), (s_global, s_local) = nmb_samples, size_crops
    student = n_global * crop(s_global) + n_local * crop(s_local)
    teacher = n_global * crop(s_global)
    return 2.0 * (3.0 * student + teacher)


def neco_step_flops(config: Any, batch_size: int | None = None) -> float:
    """Model FLOPs of one training step of a NeCo ConfigDict (global batch unless `batch_size` is given)."""
    from neco_jax.settings import from_config
    from neco_jax.train_state import vit_configs

    student_cfg, _ = vit_configs(from_config(config).model)
    per_image = neco_image_flops(
        student_cfg, config.head.to_dict(), tuple(config.data.size_crops), tuple(config.data.nmb_samples)
    )
    return per_image * (config.optim.batch_size if batch_size is None else batch_size)
