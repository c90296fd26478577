"""neco-jax: NeCo post-training of Vision Transformers in JAX/Flax.

The package import stays light: the backbone I/O (and with it JAX, Flax and the models) loads on
first use of ``load_backbone`` / ``save_backbone``.
"""

from neco_jax.errors import UserError

__all__ = ["UserError", "load_backbone", "save_backbone"]


def __getattr__(name: str):
    if name in ("load_backbone", "save_backbone"):
        from neco_jax import backbone_io  # on first use, so that `import neco_jax` stays light

        return getattr(backbone_io, name)
    raise AttributeError(f"module 'neco_jax' has no attribute {name!r}")
