"""Vision Transformers (DINOv2 and DINO families) and NeCo's projection head in Flax NNX."""

from neco_jax.models.archs import ARCHS, get_arch
from neco_jax.models.head import ProjectionHead
from neco_jax.models.vit import VisionTransformer, ViTConfig

__all__ = ["ARCHS", "get_arch", "ProjectionHead", "ViTConfig", "VisionTransformer"]
