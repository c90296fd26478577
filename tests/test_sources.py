"""Sources (folder layouts, file lists, TFDS ArrayRecord, bundled samples) and robust decoding to RGB."""

import io
import logging
import os

import numpy as np
import pytest
from PIL import Image

from input_pipeline.decode import decode_rgb
from input_pipeline.errors import DatasetError, UndecodableImageError
from input_pipeline.sample_data import SAMPLE_FILES, sample_source
from input_pipeline.sources import ConcatSource, file_list_source, list_images, make_source
from neco_jax.errors import UserError


def _rgb(h=12, w=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png(arr_or_img, **kw):
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _write(path, data=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(_png(_rgb()) if data is None else data)
    return str(path)


# ---- decoding ----------------------------------------------------------------------------------------------


def test_rgb_roundtrip_and_arrays():
    arr = _rgb()
    np.testing.assert_array_equal(np.asarray(decode_rgb(_png(arr))), arr)
    np.testing.assert_array_equal(np.asarray(decode_rgb(arr)), arr)
    gray = arr[..., 0]
    for a in (gray, gray[..., None]):
        np.testing.assert_array_equal(np.asarray(decode_rgb(a)), np.repeat(gray[..., None], 3, -1))
    rgba = np.concatenate([arr, np.full(arr.shape[:2] + (1,), 7, np.uint8)], -1)
    np.testing.assert_array_equal(np.asarray(decode_rgb(rgba)), arr)


def test_greyscale_palette_rgba_cmyk_become_rgb():
    arr = _rgb()
    gray = arr[..., 1]
    out = np.asarray(decode_rgb(_png(Image.fromarray(gray, "L"))))
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, -1))

    pal = Image.fromarray(arr).quantize(colors=8)
    expected = np.asarray(pal.convert("RGB"))
    assert decode_rgb(_png(pal)).mode == "RGB"
    np.testing.assert_array_equal(np.asarray(decode_rgb(_png(pal))), expected)

    rgba = Image.fromarray(np.concatenate([arr, np.full(arr.shape[:2] + (1,), 0, np.uint8)], -1), "RGBA")
    np.testing.assert_array_equal(np.asarray(decode_rgb(_png(rgba))), arr)  # alpha dropped, as the original

    buf = io.BytesIO()
    Image.fromarray(arr).convert("CMYK").save(buf, format="JPEG", quality=100)
    out = np.asarray(decode_rgb(buf.getvalue())).astype(int)
    assert out.shape == arr.shape and np.abs(out - arr).mean() < 12  # lossy JPEG, but the colours survive


def test_sixteen_bit_is_rescaled_not_clipped():
    ramp = np.linspace(0, 65535, 16 * 12).reshape(12, 16).astype(np.uint16)
    data = _png(Image.fromarray(ramp))
    out = np.asarray(decode_rgb(data))
    np.testing.assert_array_equal(out[..., 0], np.rint(ramp / 257.0).astype(np.uint8))
    assert out.min() == 0 and out.max() == 255


def test_exif_orientation_is_applied():
    arr = _rgb(10, 20)
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = _png(img, exif=exif.tobytes())
    np.testing.assert_array_equal(np.asarray(decode_rgb(data)), np.rot90(arr, k=-1))
    np.testing.assert_array_equal(np.asarray(decode_rgb(data, exif_transpose=False)), arr)


def test_corrupt_and_truncated_bytes_raise_undecodable():
    good = _png(_rgb(64, 64))
    for bad in (b"", b"not an image at all", good[: len(good) // 2]):
        with pytest.raises(UndecodableImageError):
            decode_rgb(bad)


# ---- folder layouts -----------------------------------------------------------------------------------------


def test_flat_and_nested_folders(tmp_path):
    _write(tmp_path / "b.jpg")
    _write(tmp_path / "a.png")
    _write(tmp_path / "sub" / "deeper" / "c.JPEG")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.png").write_bytes(b"x")
    paths = list_images(str(tmp_path))
    assert [os.path.relpath(p, tmp_path) for p in paths] == ["a.png", "b.jpg", os.path.join("sub", "deeper", "c.JPEG")]
    src = make_source("folder", str(tmp_path))
    assert len(src) == 3 and src.describe(2).endswith("c.JPEG")
    np.testing.assert_array_equal(np.asarray(decode_rgb(src[0])), _rgb())


def test_linked_folders_are_followed_once_and_cycles_end(tmp_path, caplog):
    # Two trees: a cycle and a second link into the same folder together would take exponential time unfixed.
    _write(tmp_path / "cycle" / "a" / "1.png")
    _write(tmp_path / "cycle" / "a" / "b" / "2.png")
    os.symlink(tmp_path / "cycle", tmp_path / "cycle" / "a" / "b" / "up")  # back to the root
    _write(tmp_path / "twice" / "a" / "1.png")
    _write(tmp_path / "elsewhere" / "3.png")
    os.symlink(tmp_path / "twice" / "a", tmp_path / "twice" / "again")  # a second way into a/
    os.symlink(tmp_path / "elsewhere", tmp_path / "twice" / "ext")  # a link out of the tree: followed
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with caplog.at_level(logging.WARNING, logger="input_pipeline.sources"):
        cycle, twice = list_images(str(tmp_path / "cycle")), list_images(str(tmp_path / "twice"))
    assert [os.path.relpath(p, tmp_path / "cycle") for p in cycle] == ["a/1.png", "a/b/2.png"]
    assert [os.path.relpath(p, tmp_path / "twice") for p in twice] == ["a/1.png", "ext/3.png"]
    assert "skipped 1 linked folder(s) already listed (a link cycle" in caplog.text and "b/up" in caplog.text
    assert "twice/again" in caplog.text
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist") as info:
        make_source("folder", str(tmp_path / "nope"))
    assert isinstance(info.value, UserError)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        make_source("folder", str(tmp_path / "empty"))
    with pytest.raises(DatasetError, match="train2017"):
        make_source("coco", str(tmp_path / "empty"))
    with pytest.raises(DatasetError, match="unknown dataset name"):
        make_source("cocoa", str(tmp_path))


def _imagenet100(root):
    (root).mkdir(parents=True, exist_ok=True)
    (root / "imagenet100.txt").write_text("n01\nn02\n")
    for wnid, k in (("n01", 2), ("n02", 3), ("n99", 4)):  # n99 is not in the class list
        for i in range(k):
            _write(root / "train" / wnid / f"{wnid}_{i}.JPEG")


def test_coco_imagenet100_voc_and_combined(tmp_path):
    for i in range(4):
        _write(tmp_path / "coco" / "train2017" / f"{i:012d}.jpg")
    _imagenet100(tmp_path / "in100")
    voc = tmp_path / "voc" / "VOCSegmentation"
    for i in ("2007_000032", "2008_000002"):
        _write(voc / "images" / f"{i}.jpg")
    _write(voc / "images" / "unlisted.jpg")
    (voc / "sets").mkdir()
    (voc / "sets" / "trainaug.txt").write_text("2007_000032\n2008_000002\n")

    assert len(make_source("coco", str(tmp_path / "coco"))) == 4
    assert len(make_source("coco", str(tmp_path / "coco" / "train2017"))) == 4
    in100 = make_source("imagenet100k", str(tmp_path / "in100"))
    assert len(in100) == 5 and "n99" not in " ".join(in100.describe(i) for i in range(5))
    assert len(make_source("imagenet", str(tmp_path / "in100"))) == 9
    v = make_source("voc", str(tmp_path / "voc"))
    assert len(v) == 2 and v.describe(1).endswith("2008_000002.jpg")
    assert make_source("voc", str(voc)).describe(1) == v.describe(1)  # VOCSegmentation itself, as for evaluation
    for folder, state in ((tmp_path / "coco", "holds no sets/ folder"), (tmp_path / "nowhere", "does not exist")):
        with pytest.raises(DatasetError, match=f"VOC folder {folder} {state}.*VOCSegmentation"):
            make_source("voc", str(folder))

    both = make_source("coco,imagenet100", f"{tmp_path / 'coco'},{tmp_path / 'in100'}")
    assert isinstance(both, ConcatSource) and len(both) == 9
    assert "train2017" in both.describe(3) and "n01" in both.describe(4)
    assert both[8] == in100[4]

    with pytest.raises(DatasetError, match="one per dataset"):
        make_source("coco,imagenet100", "a,b,c")


def test_layout_errors_name_the_problem(tmp_path):
    _imagenet100(tmp_path / "in100")
    (tmp_path / "in100" / "imagenet100.txt").write_text("n01\nn03\n")
    with pytest.raises(DatasetError, match="n03"):
        make_source("imagenet100", str(tmp_path / "in100"))
    voc = tmp_path / "voc"
    (voc / "sets").mkdir(parents=True)
    (voc / "sets" / "trainaug.txt").write_text("missing_id\n")
    with pytest.raises(DatasetError, match="missing_id"):
        make_source("voc", str(voc))


def test_file_list(tmp_path):
    a = _write(tmp_path / "imgs" / "a.png")
    _write(tmp_path / "imgs" / "b.png")
    lst = tmp_path / "list.txt"
    lst.write_text(f"# training images\nimgs/b.png\n\n{a}\n")
    src = file_list_source(str(lst))
    assert len(src) == 2 and src.describe(0).endswith("b.png") and src.describe(1) == a
    assert len(make_source("filelist", str(lst))) == 2
    lst.write_text("imgs/zzz.png\n")
    with pytest.raises(DatasetError, match="zzz.png"):
        file_list_source(str(lst))


# ---- TFDS ---------------------------------------------------------------------------------------------------


def test_tfds_array_record_source(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    images = [_rgb(8 + i, 10, seed=i) for i in range(5)]

    class TinyPhotos(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "photo": tfds.features.Image(shape=(None, None, 3)),
                        "label": tfds.features.ClassLabel(num_classes=2),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, im in enumerate(images):
                yield i, {"photo": Image.fromarray(im), "label": i % 2}

    TinyPhotos(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    src = make_source("tfds:tiny_photos", str(tmp_path), tfds_image_key="photo")
    assert len(src) == 5 and src.describe(3) == "tfds:tiny_photos[train][3]"
    decoded = sorted((np.asarray(decode_rgb(src[i])) for i in range(5)), key=len)  # TFDS stores them shuffled
    for got, want in zip(decoded, images):  # heights 8..12 tell the images apart
        np.testing.assert_array_equal(got, want)
    with pytest.raises(DatasetError, match="tfds_image_key"):
        make_source("tfds:tiny_photos", str(tmp_path), tfds_image_key="image")
    with pytest.raises(DatasetError, match="tfds_split"):
        make_source("tfds:tiny_photos", str(tmp_path), tfds_split="validation", tfds_image_key="photo")
    with pytest.raises(DatasetError):
        make_source("tfds:no_such_dataset_xyz", str(tmp_path))


# ---- bundled samples ----------------------------------------------------------------------------------------


def test_bundled_sample_photos(caplog):
    with caplog.at_level(logging.WARNING):
        src = sample_source()
    assert len(src) == len(SAMPLE_FILES) == 9
    assert sum("bundled sample photos" in r.getMessage() for r in caplog.records) == 1
    for i in range(len(src)):
        img = decode_rgb(src[i])
        assert img.mode == "RGB" and min(img.size) >= 300
