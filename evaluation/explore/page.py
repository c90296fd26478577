"""The explorer's one self-contained HTML file: the package's page.html with explore.css, explore.js and the data
inlined, images as JPEG data URIs. Nothing is fetched when it opens (no CDN, fonts or scripts)."""

from __future__ import annotations

import base64
import html
import importlib.resources
import json

import numpy as np

from evaluation.explore.data import ERROR_QUERIES, Explorer

COLORMAP = "inferno"  # the similarity colour scale, the same in the page and the PNG
ASSETS = ("page.html", "explore.css", "explore.js")


def asset(name: str) -> str:
    """The text of one of the package's page files (installed with the package, see pyproject.toml)."""
    return (importlib.resources.files(__package__) / "static" / name).read_text(encoding="utf-8")


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def colormap_rgb(name: str = COLORMAP) -> np.ndarray:
    """(256, 3) uint8: the matplotlib colour map the page's legend and overlays use."""
    from matplotlib import colormaps  # a slow import, only when a page or figure is made

    return (np.asarray(colormaps[name](np.linspace(0.0, 1.0, 256)))[:, :3] * 255).round().astype(np.uint8)


def title(explorer: Explorer) -> str:
    return "Patch similarity: " + " vs ".join(m.name for m in explorer.models)


def page_data(explorer: Explorer) -> dict:
    """What explore.js reads from #explore-data (arrays base64-encoded, C order)."""
    images = []
    for image in explorer.images:
        jpeg, width, height = image.display_jpeg(explorer.size)
        src = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")
        images.append({"name": image.name, "src": src, "width": width, "height": height})
    models = [
        {
            "name": m.name,
            "dims": m.dims,
            "embed_dim": m.embed_dim,
            "retained": m.retained,
            "similarity_error": m.similarity_error,
            "scales": [float(s) for s in m.scales],  # float32 values, exact as JSON doubles
            "codes": _b64(m.codes.astype(np.int8)),  # (N, h * w, dims)
            "pca_rgb": _b64(m.pca_rgb.astype(np.uint8)),  # (N, h, w, 3)
        }
        for m in explorer.models
    ]
    return {
        "size": explorer.size,
        "patch_size": explorer.patch_size,
        "grid": list(explorer.grid),
        "top_k": explorer.top_k,
        "error_queries": ERROR_QUERIES,
        "colormap": {"name": COLORMAP, "rgb": _b64(colormap_rgb())},
        "images": images,
        "models": models,
    }


def render(explorer: Explorer) -> str:
    """The whole page as one string."""
    css, js = asset("explore.css"), asset("explore.js")
    for name, text, closing in (("explore.css", css, "</style"), ("explore.js", js, "</script")):
        if closing in text.lower():
            raise AssertionError(f"{name} contains {closing}>, which would end its inlined block")
    # A "<" can only be inside a JSON string, where "\u003c" means the same and cannot end or confuse the block.
    data = json.dumps(page_data(explorer), separators=(",", ":")).replace("<", "\\u003c")
    out = asset("page.html")
    for key, value in (("title", html.escape(title(explorer))), ("css", css), ("js", js), ("data", data)):
        out = out.replace(f"<!--explore:{key}-->", value)
    return out
