"""The grain training loader: batch contract, per-epoch shuffle, sharding, determinism across runs and worker
counts, exact resume from a saved iterator state, and bad-file handling."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from input_pipeline import LoaderSettings, ViewSettings, make_train_loader
from input_pipeline.errors import DatasetError
from input_pipeline.sources import folder_source

VIEWS = ViewSettings(size_crops=(56, 28), nmb_samples=(2, 4))
N_IMAGES = 12


def _write_images(folder, n, bad=()):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        path = os.path.join(folder, f"img_{i:02d}.png")
        if i in bad:
            with open(path, "wb") as f:
                f.write(b"\x89PNG\r\n\x1a\n corrupt")
            continue
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return str(folder)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _write_images(tmp_path_factory.mktemp("imgs"), N_IMAGES)


def _loader(folder, *, views=VIEWS, num_workers=0, threads_per_worker=2, max_bad_fraction=1.0, **kw):
    """The loader of `folder` at 56/28 px, in this process, as process 0 of 1 unless `kw` says otherwise."""
    settings = LoaderSettings(
        dataset_name="folder",
        data_dir=folder,
        num_workers=num_workers,
        threads_per_worker=threads_per_worker,
        max_bad_fraction=max_bad_fraction,
    )
    return make_train_loader(views, settings, **{"batch_size": 4, "seed": 0, "process": (0, 1), **kw})


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batch_contract(folder):
    loader = _loader(folder)
    b = next(loader)
    expected = {
        "global_crops": ((4, 2, 56, 56, 3), np.uint8),
        "local_crops": ((4, 4, 28, 28, 3), np.uint8),
        "global_colour": ((4, 2, 11), np.float32),
        "local_colour": ((4, 4, 11), np.float32),
        "boxes_gc": ((4, 2, 6, 4), np.float32),
        "boxes_all": ((4, 6, 2, 4), np.float32),
        "index": ((4,), np.int64),
        "skipped": ((4,), np.int32),
    }
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == expected
    assert loader.steps_per_epoch == 3 and loader.num_records == N_IMAGES
    np.testing.assert_array_equal(b["boxes_gc"][:, 0, 0], np.tile([0, 0, 56, 56], (4, 1)))
    host = next(
        _loader(folder, views=ViewSettings(size_crops=(56, 28), augment_on="host"))
    )  # the original's PIL path: float crops
    assert {k: (v.shape, v.dtype) for k, v in host.items()} == {
        **{k: v for k, v in expected.items() if not k.endswith("colour")},
        "global_crops": ((4, 2, 56, 56, 3), np.float32),
        "local_crops": ((4, 4, 28, 28, 3), np.float32),
    }
    assert -3 < host["global_crops"].min() < host["global_crops"].max() < 3  # ImageNet-normalised range
    np.testing.assert_array_equal(host["boxes_all"], b["boxes_all"])  # same draws


def test_epochs_shuffle_and_stop(folder):
    batches = list(_loader(folder, num_epochs=2))
    assert len(batches) == 6
    epochs = [np.concatenate([b["index"] for b in batches[s : s + 3]]) for s in (0, 3)]
    for e in epochs:
        assert sorted(e.tolist()) == list(range(N_IMAGES))  # each epoch is a permutation
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled per epoch
    assert not np.array_equal(epochs[0], np.arange(N_IMAGES))
    in_order = np.concatenate([b["index"] for b in _loader(folder, num_epochs=1, shuffle=False)])
    np.testing.assert_array_equal(in_order, np.arange(N_IMAGES))


def test_drop_remainder_and_process_shards(folder):
    shards = [list(_loader(folder, num_epochs=1, batch_size=2, process=(p, 2))) for p in (0, 1)]
    assert [len(s) for s in shards] == [3, 3]  # 12 // (2 x 2)
    idx = [np.concatenate([b["index"] for b in s]) for s in shards]
    assert not set(idx[0]) & set(idx[1]) and len(set(idx[0]) | set(idx[1])) == N_IMAGES
    # the shards are the rows of the single-process order with a global batch of 4
    single = np.concatenate([b["index"] for b in _loader(folder, num_epochs=1, batch_size=4)])
    np.testing.assert_array_equal(np.stack(idx).reshape(2, 3, 2).transpose(1, 0, 2).ravel(), single)
    odd = list(_loader(folder, num_epochs=1, batch_size=5))
    assert len(odd) == 2  # 12 // 5, the last partial batch dropped


def test_deterministic_across_runs_and_seeds(folder):
    _assert_same(_take(_loader(folder), 3), _take(_loader(folder), 3))
    other = next(_loader(folder, seed=1))
    assert not np.array_equal(other["global_crops"], next(_loader(folder))["global_crops"])


def test_resume_yields_exactly_the_remaining_batches(folder):
    reference = _take(_loader(folder), 5)
    first = _loader(folder)
    _take(first, 2)
    state = json.loads(json.dumps(first.get_state()))  # must survive a checkpoint as JSON
    resumed = _loader(folder)
    resumed.set_state(state)
    _assert_same(_take(resumed, 3), reference[2:])
    first.set_state({"next_batch": 0, "bad_files": 0, "files_read": 0})  # rewinding works on a used loader too
    _assert_same(_take(first, 2), reference[:2])


@pytest.mark.slow
def test_worker_count_does_not_change_the_data_or_the_state(folder):
    serial = _take(_loader(folder, num_workers=0), 4)
    loader = _loader(folder, num_workers=2)
    _assert_same(_take(loader, 2), serial[:2])
    state = json.loads(json.dumps(loader.get_state()))
    loader.close()
    with pytest.raises(ValueError):
        next(loader)
    resumed = _loader(folder, num_workers=0, threads_per_worker=3)  # resume on a different worker setup
    resumed.set_state(state)
    _assert_same(_take(resumed, 2), serial[2:])


def test_corrupt_file_is_skipped_and_counted(tmp_path):
    folder = _write_images(tmp_path / "imgs", N_IMAGES, bad={5})
    loader = _loader(folder, num_epochs=1)
    batches = list(loader)
    skipped = np.concatenate([b["skipped"] for b in batches])
    used = np.concatenate([b["index"] for b in batches])
    assert skipped.sum() == 1 and loader.bad_files == 1 and loader.files_read == N_IMAGES + 1
    assert 5 not in used and used[skipped == 1] == [6]  # replaced by the next record
    assert list(loader.recent_bad) == [os.path.join(folder, "img_05.png")]
    assert loader.get_state()["bad_files"] == 1


def test_too_many_bad_files_stop_with_examples(tmp_path):
    folder = _write_images(tmp_path / "imgs", N_IMAGES, bad={1, 4, 7, 9})
    loader = _loader(folder, max_bad_fraction=0.01)
    with pytest.raises(DatasetError, match=r"img_0[1479]\.png") as info:
        _take(loader, 3)
    assert "max_bad_fraction" in str(info.value)


def test_all_bad_files_fail_clearly(tmp_path):
    folder = _write_images(tmp_path / "imgs", 4, bad=set(range(4)))
    with pytest.raises(DatasetError, match="consecutive"):
        next(_loader(folder))


def test_dataset_smaller_than_a_batch_and_sample_default(tmp_path, caplog):
    folder = _write_images(tmp_path / "few", 3)
    with pytest.raises(DatasetError, match="fewer than one global batch"):
        _loader(folder)
    loader = make_train_loader(VIEWS, LoaderSettings(num_workers=0), batch_size=2, seed=0, process=(0, 1))
    assert loader.num_records == 9 and "bundled sample photos" in caplog.text
    assert next(loader)["global_crops"].shape == (2, 2, 56, 56, 3)
    custom = make_train_loader(
        VIEWS, LoaderSettings(), batch_size=2, seed=0, source=folder_source(folder), process=(0, 1)
    )
    assert custom.num_records == 3
