"""What `python -m evaluation.explore` does (the flags are in evaluation/explore/__main__.py), step by step: check
the settings and the outputs, read and check every input, compute and encode the features, write the page and
the PNG. Every input is read and checked before the first feature is computed, and this module loads JAX,
Flax and matplotlib only once the settings are known to be good.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from neco_jax.errors import ConfigError
from neco_jax.files import atomic_write, atomic_write_text


@dataclasses.dataclass(frozen=True)
class Settings:
    """The command's flags (evaluation/explore/__main__.py: what each means, and the defaults)."""

    checkpoints: Sequence[str]
    images: Sequence[str]
    out: str
    size: int
    max_images: int
    dims: int
    top_k: int
    which: str
    batch_size: int
    png: str | None
    png_view: str


def parse_png(spec: str) -> tuple[str, int, int]:
    """`IMAGE:ROW,COL` -> (IMAGE, ROW, COL); IMAGE stays text (an index or a name, resolved with the images)."""
    image, sep, patch = spec.rpartition(":")
    try:
        row, col = (int(v) for v in patch.split(","))
    except ValueError:
        row = None
    if not sep or not image or row is None:
        raise ConfigError(f"--png={spec} is not IMAGE:ROW,COL; e.g. --png=0:16,16 or --png=astronaut.png:10,12")
    return image, row, col


def resolve_image(spec: str, names: Sequence[str]) -> int:
    """An image's index from its index or its name (or the name's last part)."""
    if spec.isdigit():
        return int(spec)
    matches = [i for i, name in enumerate(names) if spec in (name, Path(name).name, Path(name).stem)]
    if len(matches) != 1:
        raise ConfigError(
            f"--png image {spec!r} names {'no' if not matches else 'more than one'} image; "
            f"use an index from 0 or one of {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}"
        )
    return matches[0]


def output_paths(settings: Settings) -> tuple[Path, Path | None]:
    """The page's path and the PNG's (None without --png), neither of which may exist yet."""
    out = Path(settings.out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"--out={out}: name an .html file")
    png = out.with_suffix(".png") if settings.png else None
    for path in (out, png):
        if path is not None and (path.exists() or path.is_symlink()):
            raise ConfigError(f"{path} already exists; choose another --out (nothing is overwritten)")
    if not out.parent.is_dir():
        raise ConfigError(f"--out={out}: the folder {out.parent} does not exist")
    return out, png


def _no_clobber(path: Path, write) -> None:
    if path.exists():  # appeared while the features were computed
        raise ConfigError(f"{path} already exists; choose another --out (nothing is overwritten)")
    write(path)


def build(settings: Settings):
    """The page's content and the PNG's query (image, row, column) or None."""
    from evaluation.explore import data  # JAX and Flax: only once the settings are known to be good

    images = [data.read_image(name, path) for name, path in data.image_paths(settings.images, settings.max_images)]
    query = None
    if settings.png:
        name, row, col = parse_png(settings.png)
        query = (resolve_image(name, [i.name for i in images]), row, col)
    models, patch = data.load_models(settings.checkpoints, settings.which, settings.size)
    if query is not None:
        data.check_query(len(images), (settings.size // patch,) * 2, *query)
    features = data.model_features(
        images, models, settings.checkpoints, size=settings.size, batch_size=settings.batch_size
    )
    del models
    encoded = [data.encode_features(name, f, settings.dims) for name, f in zip(settings.checkpoints, features)]
    return data.Explorer(images, encoded, settings.size, patch, settings.top_k), query


def run(settings: Settings) -> None:
    """Write the page (and the PNG), or stop with a UserError before anything is written."""
    out, png = output_paths(settings)
    explorer, query = build(settings)
    from evaluation.explore import figure, page  # matplotlib: only when there is something to draw

    text = page.render(explorer)
    _no_clobber(out, lambda p: atomic_write_text(p, text))
    h, w = explorer.grid
    print(f"wrote {out} ({len(text.encode()) / 1e6:.1f} MB): {len(explorer.images)} images, {h}x{w} patches")
    for label, m in zip(figure.model_labels(len(explorer.models)), explorer.models):
        print(
            f"  {label} = {m.name}: {m.embed_dim} -> {m.dims} dims ({100 * m.retained:.1f}% of the energy), "
            f"cosine error mean {m.similarity_error['mean']:.4f}, max {m.similarity_error['max']:.4f}"
        )
    if query is not None:
        fig = figure.draw(explorer, *query, view=settings.png_view)
        _no_clobber(png, lambda p: atomic_write(p, lambda tmp: fig.savefig(tmp, format="png")))
        print(f"wrote {png}")
