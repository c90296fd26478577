"""Decode any stored image (file bytes, PIL image or array) to an RGB PIL image, so later stages see one format.

The original reads images with `PIL.Image.open(f).convert("RGB")`; we do the same for 8-bit modes (alpha is
dropped, not composited, as there). Two deliberate differences, both about images that convert badly:
16-bit and float greyscale are rescaled to 8 bits instead of being clipped at 255 (PIL's `convert` clips),
and the EXIF orientation tag is applied (switch off with `exif_transpose=False` for the original's behaviour).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from input_pipeline.errors import UndecodableImageError

_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer or float greyscale -> 8-bit L, keeping the full range instead of clipping."""
    arr = np.asarray(img)
    if img.mode == "F":
        arr = np.nan_to_num(arr.astype(np.float64))
        scale = 1.0 if arr.max(initial=0.0) <= 1.0 else 255.0
        arr = np.clip(arr / scale * 255.0, 0, 255)
    else:
        arr = np.clip(arr.astype(np.float64), 0, 65535) / 257.0
    return Image.fromarray(np.rint(arr).astype(np.uint8), "L")


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    """uint8 arrays from TFDS-like sources: (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)."""
    arr = np.asarray(arr)
    if arr.dtype == np.uint16:
        arr = np.rint(arr / 257.0).astype(np.uint8)
    if arr.dtype != np.uint8:
        raise UndecodableImageError(f"image array has dtype {arr.dtype}; expected uint8 or uint16")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        return Image.fromarray(arr, "L")
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        return Image.fromarray(arr[..., :3], "RGB")
    raise UndecodableImageError(f"image array has shape {arr.shape}; expected (H, W[, 1|3|4])")


def decode_rgb(data: bytes | np.ndarray | Image.Image, *, exif_transpose: bool = True) -> Image.Image:
    """Return the image as a fully loaded RGB PIL image; raise `UndecodableImageError` if it cannot be read."""
    try:
        if isinstance(data, np.ndarray):
            img = _array_to_pil(data)
        else:
            img = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data))
            img.load()  # decode now: truncated or corrupt files fail here, not later in a worker
            if exif_transpose:
                img = ImageOps.exif_transpose(img)
        if img.mode in _HIGH_DEPTH_MODES:
            img = _high_depth_to_l(img)
        if img.mode != "RGB":
            img = img.convert("RGB")
        if img.width < 1 or img.height < 1:
            raise UndecodableImageError(f"image has size {img.size}")
        return img
    except UndecodableImageError:
        raise
    except UnidentifiedImageError as exc:
        raise UndecodableImageError("not a recognised image format (corrupt or not an image)") from exc
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBomb...)
        raise UndecodableImageError(f"{type(exc).__name__}: {exc}") from exc
