"""`python -m evaluation.explore`: a self-contained HTML page for exploring which patches backbones find similar.

    python -m evaluation.explore --checkpoint=A [--checkpoint=B ...] --images=DIR_OR_FILES --out=explore.html \
        [--size=448] [--max_images=24] [--dims=128] [--top_k=5] [--png=IMAGE:ROW,COL [--png_view=sim|pca]]

--checkpoint takes anything `neco_jax.load_backbone` takes (a known name, a weight file, a saved or transformers
folder) or a training workdir (its export, else its newest intact checkpoint; --which picks the teacher or the
student). --images takes folders, image files, or `sample` (the bundled photos); repeat it for more. The page
opens from disk in any browser without a network. --png also writes the view with query patch (ROW, COL) of
IMAGE (its index from 0 or its name) as OUT with the suffix .png. Bad input (no or unreadable images, a
checkpoint that does not load, an --out or PNG that already exists) stops with one line and exit status 2 before
anything is written; nothing is ever overwritten.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from absl import flags

from neco_jax.errors import ConfigError, cli
from neco_jax.files import atomic_write, atomic_write_text


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_multi_string(
        "checkpoint",
        None,
        "A backbone (anything load_backbone takes) or a training workdir; repeat it.",
        flag_values=fv,
    )
    flags.DEFINE_multi_string(
        "images",
        None,
        "A folder of images, an image file, or 'sample' (the bundled photos); repeat it.",
        flag_values=fv,
    )
    flags.DEFINE_string("out", None, "The HTML file to write (must not exist).", flag_values=fv)
    flags.DEFINE_integer("size", 448, "Side in pixels of the square input the models see.", flag_values=fv)
    flags.DEFINE_integer("max_images", 24, "Use the first this many images.", flag_values=fv)
    flags.DEFINE_integer(
        "dims", 128, "Principal axes kept of each model's features (at most its width).", flag_values=fv
    )
    flags.DEFINE_integer("top_k", 5, "Nearest patches marked on every image.", flag_values=fv)
    flags.DEFINE_enum(
        "which", "teacher", ["teacher", "student"], "The ViT of NeCo checkpoints and workdirs.", flag_values=fv
    )
    flags.DEFINE_integer("batch_size", 8, "Images per forward pass.", flag_values=fv)
    flags.DEFINE_string("png", None, "IMAGE:ROW,COL: also write that view as OUT with the suffix .png.", flag_values=fv)
    flags.DEFINE_enum("png_view", "sim", ["sim", "pca"], "The PNG's view: similarity or PCA-RGB.", flag_values=fv)


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


def check_settings(fv: flags.FlagValues) -> tuple[Path, Path | None]:
    """Everything checkable before any work: the output paths (which must not exist) and the numbers."""
    for name in ("checkpoint", "images", "out"):
        if not fv[name].value:
            raise ConfigError(f"--{name} is required; see python -m evaluation.explore --help")
    for name in ("size", "max_images", "dims", "top_k", "batch_size"):
        if fv[name].value < 1:
            raise ConfigError(f"--{name} must be at least 1, got {fv[name].value}")
    out = Path(fv.out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"--out={out}: name an .html file")
    png = out.with_suffix(".png") if fv.png else None
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


def build(fv: flags.FlagValues):
    """The page's content for the parsed flags, and the PNG's query (image, row, column) or None; every input is
    read and checked before the first feature is computed."""
    from evaluation.explore import data  # JAX and Flax: only once the command line is known to be good

    images = [data.read_image(name, path) for name, path in data.image_paths(fv.images, fv.max_images)]
    query = None
    if fv.png:
        name, row, col = parse_png(fv.png)
        query = (resolve_image(name, [i.name for i in images]), row, col)
    models, patch = data.load_models(fv.checkpoint, fv.which, fv.size)
    if query is not None:
        data.check_query(len(images), (fv.size // patch,) * 2, *query)
    features = data.model_features(images, models, fv.checkpoint, size=fv.size, batch_size=fv.batch_size)
    del models
    encoded = [data.encode_features(name, f, fv.dims) for name, f in zip(fv.checkpoint, features)]
    return data.Explorer(images, encoded, fv.size, patch, fv.top_k), query


@cli
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    fv = flags.FlagValues()
    define_flags(fv)
    if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
        print(__doc__ + "\n" + fv.get_help())
        return 0
    try:
        rest = fv(argv)
    except flags.Error as err:
        raise ConfigError(" ".join(str(err).split()) + "; see python -m evaluation.explore --help") from None
    if len(rest) > 1:
        raise ConfigError(f"unexpected arguments: {' '.join(rest[1:])}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out, png = check_settings(fv)
    explorer, query = build(fv)
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
        fig = figure.draw(explorer, *query, view=fv.png_view)
        _no_clobber(png, lambda p: atomic_write(p, lambda tmp: fig.savefig(tmp, format="png")))
        print(f"wrote {png}")
    return 0
