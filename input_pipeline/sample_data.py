"""The bundled sample set: scikit-image's offline photos, used when no data directory is configured.

They are read from the installed scikit-image package (a core dependency whose wheel ships them, BSD-3) rather
than copied into this repository: nothing to vendor or license-track, and the nine RGB photos (about 4 MB as
stored) are too big to re-encode under our 1 MB budget without visible damage.
"""

from __future__ import annotations

import logging
import os

import skimage.data

from input_pipeline.errors import DatasetError
from input_pipeline.sources import FileSource

# The real RGB photographs among skimage's offline files (synthetic/greyscale/RGBA test patterns left out).
SAMPLE_FILES = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "retina.jpg",
)


def sample_image_paths() -> list[str]:
    folder = os.path.dirname(skimage.data.__file__)
    paths = [os.path.join(folder, f) for f in SAMPLE_FILES if os.path.isfile(os.path.join(folder, f))]
    if not paths:
        raise DatasetError(
            f"the bundled sample photos were not found in {folder!r}; reinstall scikit-image or set config.data.data_dir"
        )
    return paths


def sample_source(*, notice: bool = True) -> FileSource:
    paths = sample_image_paths()
    if notice:
        logging.getLogger(__name__).warning(
            "No data directory configured: training on the %d bundled sample photos from scikit-image "
            "(set config.data.data_dir for real data).",
            len(paths),
        )
    return FileSource(paths, "sample")
