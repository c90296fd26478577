"""Grain input pipeline: image sources, NeCo's multi-crop views with their boxes, and the training loader.

The package import stays light (its errors module holds the root of every user error, which `neco_jax`
imports): the loader (and with it Grain and JAX) loads on first use of ``make_train_loader`` etc.
"""

from input_pipeline.settings import LoaderSettings

__all__ = ["LoaderSettings", "TrainLoader", "ViewSettings", "make_train_loader"]


def __getattr__(name: str):
    if name in ("TrainLoader", "make_train_loader"):
        from input_pipeline import loader  # Grain and JAX: on first use, not with the errors module

        return getattr(loader, name)
    if name == "ViewSettings":
        from input_pipeline import views  # PIL and NumPy: on first use

        return views.ViewSettings
    raise AttributeError(f"module 'input_pipeline' has no attribute {name!r}")
