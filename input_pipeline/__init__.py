"""Grain input pipeline: image sources, NeCo's multi-crop views with their boxes, and the training loader."""

from input_pipeline.loader import TrainLoader, make_train_loader
from input_pipeline.views import ViewConfig

__all__ = ["TrainLoader", "ViewConfig", "make_train_loader"]
