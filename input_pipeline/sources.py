"""Random-access image sources (grain `RandomAccessDataSource` protocol) for the training layouts of NeCo.

Every source returns the stored image (encoded bytes, or a uint8 array for TFDS) from `source[i]` and a
human-readable name from `source.describe(i)`, so errors and skip reports can point at the file.
Layouts (the original's `DATASET.md` and `data/` readers in vpariza/NeCo; docs/method.md):
  coco          data_dir/train2017/*  (data_dir may also be the train2017 folder itself)
  imagenet100   data_dir/imagenet100.txt (one wnid per line) + data_dir/train/<wnid>/*  (alias imagenet100k)
  imagenet      data_dir/train/<wnid>/*  (every class folder)
  voc           data_dir[/VOCSegmentation]/sets/<split>.txt + images/<id>.jpg  (split trainaug by default;
                `voc_folder`, which the evaluation's VOC reader shares)
  folder        any flat or nested folder of images
  filelist      a text file with one image path per line (relative paths are relative to the list file)
Several datasets combine with commas, e.g. dataset_name "coco,imagenet100" and data_dir "/coco,/in100".
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from input_pipeline.errors import DatasetError
from input_pipeline.settings import LoaderSettings
from input_pipeline.tfds_source import TfdsSource

_log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".jfif")


class FileSource:
    """Images stored as files; `source[i]` returns the file's bytes (read errors surface at decode time)."""

    def __init__(self, paths: Sequence[str], name: str):
        if not paths:
            raise DatasetError(f"dataset {name!r} has no images; check config.data.data_dir")
        self.paths = list(paths)
        self.name = name

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> bytes:
        with open(self.paths[index], "rb") as f:
            return f.read()

    def describe(self, index: int) -> str:
        return self.paths[index]

    def __repr__(self) -> str:
        return f"FileSource({self.name!r}, {len(self)} images)"


class ConcatSource:
    """Several sources read as one, in the given order (the original's "coco,imagenet100k" style sets)."""

    def __init__(self, sources: Sequence):
        self.sources = list(sources)
        self._starts = []
        total = 0
        for s in self.sources:
            self._starts.append(total)
            total += len(s)
        self._len = total

    def _locate(self, index: int):
        for start, s in zip(reversed(self._starts), reversed(self.sources)):
            if index >= start:
                return s, index - start
        raise IndexError(index)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int):
        s, i = self._locate(index)
        return s[i]

    def describe(self, index: int) -> str:
        s, i = self._locate(index)
        return s.describe(i)

    def __repr__(self) -> str:
        return f"ConcatSource({self.sources})"


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise DatasetError(f"{what} folder {path!r} does not exist; point config.data.data_dir at the right root")


def list_images(root: str, *, recursive: bool = True) -> list[str]:
    """All image files under `root` (nested folders too), sorted so the index order never depends on the OS.

    Links to folders are followed, each real folder once: a link back to a folder already listed (a cycle,
    which would otherwise list its files again at every depth) or a second link to one is skipped, with a
    warning that names it.
    """
    _require_dir(root, "image")
    found = []
    if recursive:
        seen, skipped = {_folder_id(root)}, []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            kept = []
            for d in sorted(d for d in dirnames if not d.startswith(".")):
                folder = _folder_id(os.path.join(dirpath, d))
                if folder in seen:
                    skipped.append(os.path.join(dirpath, d))
                else:
                    seen.add(folder)
                    kept.append(d)
            dirnames[:] = kept
            found.extend(os.path.join(dirpath, f) for f in filenames if _is_image(f))
        if skipped:
            _log.warning(
                "%s: skipped %d linked folder(s) already listed (a link cycle or a second link to the same "
                "folder), e.g. %s",
                root,
                len(skipped),
                ", ".join(skipped[:3]),
            )
    else:
        found = [os.path.join(root, f) for f in os.listdir(root) if _is_image(f)]
    if not found:
        raise DatasetError(
            f"no images ({', '.join(IMAGE_EXTENSIONS[:3])}, ...) found under {root!r}; "
            "check config.data.data_dir and config.data.dataset_name"
        )
    return sorted(found)


def _folder_id(path: str) -> tuple[int, int]:
    """What makes a folder the same folder, whatever link leads to it."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def folder_source(root: str) -> FileSource:
    return FileSource(list_images(root), f"folder:{root}")


def coco_source(root: str) -> FileSource:
    """COCO training images: `root/train2017/*` as the original reads them (or `root` if it is train2017)."""
    train = root if os.path.basename(os.path.normpath(root)) == "train2017" else os.path.join(root, "train2017")
    if not os.path.isdir(train):
        raise DatasetError(
            f"COCO folder {train!r} does not exist; set config.data.data_dir to the folder that contains train2017/"
        )
    return FileSource(list_images(train), "coco")


def _read_lines(path: str, what: str) -> list[str]:
    if not os.path.isfile(path):
        raise DatasetError(f"{what} {path!r} does not exist; check config.data.data_dir")
    with open(path) as f:
        lines = [ln.strip() for ln in f]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise DatasetError(f"{what} {path!r} is empty")
    return lines


def imagenet_source(root: str, class_list: str | None = None, *, name: str = "imagenet") -> FileSource:
    """ImageNet train layout `root/train/<wnid>/*`, restricted to the wnids of `class_list` when given."""
    train = os.path.join(root, "train")
    _require_dir(train, "ImageNet train")
    if class_list is None:
        wnids = sorted(d for d in os.listdir(train) if os.path.isdir(os.path.join(train, d)))
    else:
        wnids = [ln.split()[0] for ln in _read_lines(class_list, "class list file")]
    missing = [w for w in wnids if not os.path.isdir(os.path.join(train, w))]
    if missing:
        raise DatasetError(
            f"{len(missing)} class folder(s) listed in {class_list!r} are missing under {train!r} "
            f"(e.g. {', '.join(missing[:3])}); check the dataset extraction"
        )
    paths = []
    for w in wnids:
        paths.extend(list_images(os.path.join(train, w)))
    return FileSource(paths, name)


def imagenet100_source(root: str) -> FileSource:
    return imagenet_source(root, os.path.join(root, "imagenet100.txt"), name="imagenet100")


def _check_exist(paths: Sequence[str], what: str) -> None:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DatasetError(
            f"{len(missing)} image(s) named in {what} do not exist (e.g. {', '.join(missing[:3])}); "
            "fix the list or the data folder"
        )


VOC_SUBFOLDER = "VOCSegmentation"


def find_voc_folder(data_dir: str | os.PathLike) -> str | None:
    """The folder holding Pascal VOC's split lists `sets/` (and `images/` beside them): `data_dir/VOCSegmentation`,
    or `data_dir` itself (a user may name either); None when neither does."""
    for folder in (os.path.join(data_dir, VOC_SUBFOLDER), os.fspath(data_dir)):
        if os.path.isdir(os.path.join(folder, "sets")):
            return folder
    return None


def voc_folder(data_dir: str | os.PathLike) -> str:
    """`find_voc_folder`, or a DatasetError naming both layouts. The one VOC folder rule of training and evaluation."""
    folder = find_voc_folder(data_dir)
    if folder is None:
        state = "does not exist" if not os.path.isdir(data_dir) else "holds no sets/ folder"
        raise DatasetError(
            f"VOC folder {data_dir} {state}; pass the folder holding {VOC_SUBFOLDER}/ (or {VOC_SUBFOLDER}/ itself), "
            "with sets/<split>.txt and images/<id>.jpg inside"
        )
    return folder


def voc_source(root: str, split: str = "trainaug") -> FileSource:
    """Pascal VOC by list file: `sets/<split>.txt` naming `images/<id>.jpg`, in the folder `voc_folder` finds."""
    base = voc_folder(root)
    list_file = os.path.join(base, "sets", f"{split}.txt")
    ids = _read_lines(list_file, "VOC split list")
    paths = [os.path.join(base, "images", f"{i}.jpg") for i in ids]
    _check_exist(paths, list_file)
    return FileSource(paths, f"voc:{split}")


def file_list_source(list_file: str) -> FileSource:
    """A text file of image paths, one per line; relative paths are taken relative to the list file."""
    base = os.path.dirname(os.path.abspath(list_file))
    paths = [p if os.path.isabs(p) else os.path.join(base, p) for p in _read_lines(list_file, "image list file")]
    _check_exist(paths, list_file)
    return FileSource(paths, f"filelist:{list_file}")


_BUILDERS = {
    "coco": coco_source,
    "imagenet100": imagenet100_source,
    "imagenet100k": imagenet100_source,
    "imagenet": imagenet_source,
    "voc": voc_source,
    "folder": folder_source,
    "filelist": file_list_source,
}


def make_source(
    dataset_name: str,
    data_dir: str,
    *,
    tfds_split: str = LoaderSettings.tfds_split,
    tfds_image_key: str = LoaderSettings.tfds_image_key,
):
    """Build the source for `dataset_name` ("coco", "coco,imagenet100", "tfds:name[/config]", ...).

    `data_dir` gives one root per comma-separated dataset name (a single root is shared by all names, e.g. a
    folder with COCO's train2017/ next to ImageNet-100's train/ and imagenet100.txt).
    """
    names = [n.strip() for n in dataset_name.split(",") if n.strip()]
    dirs = [d.strip() for d in str(data_dir).split(",")]
    if not names:
        raise DatasetError("config.data.dataset_name is empty; use e.g. 'coco', 'imagenet100', 'folder' or 'tfds:NAME'")
    if len(dirs) == 1:
        dirs = dirs * len(names)
    if len(dirs) != len(names):
        raise DatasetError(
            f"config.data.data_dir has {len(dirs)} comma-separated roots for {len(names)} datasets "
            f"({dataset_name!r}); give one root, or one per dataset"
        )
    sources = []
    for name, root in zip(names, dirs):
        if name.startswith("tfds:"):
            sources.append(TfdsSource(name[len("tfds:") :], data_dir=root, split=tfds_split, image_key=tfds_image_key))
        elif name in _BUILDERS:
            sources.append(_BUILDERS[name](root))
        else:
            raise DatasetError(
                f"unknown dataset name {name!r} in config.data.dataset_name; "
                f"use one of {', '.join(sorted(_BUILDERS))} or 'tfds:NAME'"
            )
    return sources[0] if len(sources) == 1 else ConcatSource(sources)
