r"""`python -m evaluation.explore`: one self-contained HTML page that shows which patches backbones find similar.

    python -m evaluation.explore --checkpoint=A [--checkpoint=B ...] --images=DIR_OR_FILES --out=explore.html \
        [--size=448] [--max_images=24] [--dims=128] [--top_k=5] [--png=IMAGE:ROW,COL [--png_view=sim|pca]]

--checkpoint takes anything `neco_jax.load_backbone` takes (a known name, a weight file, a saved or transformers
folder) or a training workdir (its export, else its newest intact checkpoint; --which picks the teacher or the
student). --images takes folders, image files, or `sample` (the bundled photos); repeat it for more. The page
opens from disk in any browser without a network. --png also writes the view with query patch (ROW, COL) of
IMAGE (its index from 0 or its name) as OUT with the suffix .png. Bad input (no or unreadable images, a
checkpoint that does not load, an --out or PNG that already exists) stops with one line and exit status 2 before
anything is written; nothing is ever overwritten. What it does: evaluation/explore/command.py.
"""

from absl import flags

from evaluation.explore import command
from neco_jax import program

_CHECKPOINT = flags.DEFINE_multi_string(
    "checkpoint", None, "A backbone (anything load_backbone takes) or a training workdir; repeat it."
)
_IMAGES = flags.DEFINE_multi_string(
    "images", None, "A folder of images, an image file, or 'sample' (the bundled photos); repeat it."
)
_OUT = flags.DEFINE_string("out", None, "The HTML file to write (must not exist).")
_SIZE = flags.DEFINE_integer("size", 448, "Side in pixels of the square input the models see.", lower_bound=1)
_MAX_IMAGES = flags.DEFINE_integer("max_images", 24, "Use the first this many images.", lower_bound=1)
_DIMS = flags.DEFINE_integer(
    "dims", 128, "Principal axes kept of each model's features (at most its width).", lower_bound=1
)
_TOP_K = flags.DEFINE_integer("top_k", 5, "Nearest patches marked on every image.", lower_bound=1)
_WHICH = flags.DEFINE_enum("which", "teacher", ["teacher", "student"], "The ViT of NeCo checkpoints and workdirs.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Images per forward pass.", lower_bound=1)
_PNG = flags.DEFINE_string("png", None, "IMAGE:ROW,COL: also write that view as OUT with the suffix .png.")
_PNG_VIEW = flags.DEFINE_enum("png_view", "sim", ["sim", "pca"], "The PNG's view: similarity or PCA-RGB.")
flags.mark_flags_as_required(["checkpoint", "images", "out"])


def main(argv: list[str]) -> None:
    program.flags_only(argv)
    command.run(
        command.Settings(
            checkpoints=_CHECKPOINT.value,
            images=_IMAGES.value,
            out=_OUT.value,
            size=_SIZE.value,
            max_images=_MAX_IMAGES.value,
            dims=_DIMS.value,
            top_k=_TOP_K.value,
            which=_WHICH.value,
            batch_size=_BATCH_SIZE.value,
            png=_PNG.value,
            png_view=_PNG_VIEW.value,
        )
    )


if __name__ == "__main__":
    program.run(main)
