"""Vision Transformers (DINOv2 and DINO families) and NeCo's projection head in Flax NNX.

The package import stays light: `ViTConfig` and the named architectures load without JAX (the training
settings and the recipe configs read them); the modules load Flax on first use.
"""

from neco_jax.models.archs import ARCHS, get_arch
from neco_jax.models.vit_config import ViTConfig

__all__ = ["ARCHS", "get_arch", "ProjectionHead", "ViTConfig", "VisionTransformer"]


def __getattr__(name: str):
    if name == "ProjectionHead":
        from neco_jax.models.head import ProjectionHead  # Flax: on first use

        return ProjectionHead
    if name == "VisionTransformer":
        from neco_jax.models.vit import VisionTransformer  # Flax: on first use

        return VisionTransformer
    raise AttributeError(f"module 'neco_jax.models' has no attribute {name!r}")
