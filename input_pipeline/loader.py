"""The NeCo training loader: grain MapDataset -> views -> batches, sharded per process, checkpointable.

Order: epoch e visits a permutation of the dataset (grain's index shuffle seeded by seed + e), truncated to
`steps_per_epoch * batch_size * process_count` positions (drop_remainder per epoch, like the original's
`drop_last`); process p takes rows [p*B, (p+1)*B) of every global batch. Example randomness (crop boxes, colour)
comes from `np.random.default_rng([seed, epoch, index])`, so a run is reproducible and the same whatever the
number of workers. A record that cannot be read or decoded is replaced by the next record of the dataset and
counted in the batch's `skipped` field; the loader keeps running totals and stops with an error naming
examples once the bad fraction exceeds `max_bad_fraction` (measured over at least 100 files).
"""

from __future__ import annotations

import collections
import dataclasses
import logging

import grain
import jax
import numpy as np
from absl import flags

from input_pipeline.decode import decode_rgb
from input_pipeline.errors import ConfigError, DatasetError, UndecodableImageError
from input_pipeline.sample_data import sample_source
from input_pipeline.sources import make_source
from input_pipeline.views import ViewConfig, make_views

_log = logging.getLogger(__name__)
MIN_FILES_FOR_BAD_FRACTION = 100
MAX_CONSECUTIVE_BAD = 20


def _get(cfg, key, default):
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _numbers(data_cfg, key: str, default: tuple, kind: type) -> tuple:
    """The tuple field ``data.<key>`` as ``kind`` (int or float); anything else is one line naming the field
    (a command-line override such as ``"(56,abc)"`` reaches here as the string element ``'(56,abc)'``)."""
    value = _get(data_cfg, key, default)
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or float(v).is_integer())
        for v in items
    ):
        return tuple(kind(v) for v in items)
    what = "whole numbers" if kind is int else "numbers"
    raise ConfigError(f'config.data.{key}={value!r} must be a tuple of {what}, e.g. --config.data.{key}="{default}"')


def view_config_from(data_cfg) -> ViewConfig:
    """Read the original's data keys (size_crops, nmb_samples, ...) from a ConfigDict / dict / object."""
    d = ViewConfig()
    return ViewConfig(
        size_crops=_numbers(data_cfg, "size_crops", d.size_crops, int),
        nmb_crops=_numbers(data_cfg, "nmb_samples", d.nmb_crops, int),
        min_scale_crops=_numbers(data_cfg, "min_scale_crops", d.min_scale_crops, float),
        max_scale_crops=_numbers(data_cfg, "max_scale_crops", d.max_scale_crops, float),
        min_intersection=float(_get(data_cfg, "min_intersection_crops", d.min_intersection)),
        jitter_strength=float(_get(data_cfg, "jitter_strength", d.jitter_strength)),
        blur_strength=float(_get(data_cfg, "blur_strength", d.blur_strength)),
        jitter_prob=float(_get(data_cfg, "jitter_prob", d.jitter_prob)),
        grayscale_prob=float(_get(data_cfg, "grayscale_prob", d.grayscale_prob)),
        blur_prob=float(_get(data_cfg, "blur_prob", d.blur_prob)),
        max_resample_tries=int(_get(data_cfg, "max_resample_tries", d.max_resample_tries)),
        augment_on=str(_get(data_cfg, "augment_on", d.augment_on)),
        augment_numerics=str(_get(data_cfg, "augment_numerics", d.augment_numerics)),
    )


def source_from(data_cfg):
    """The configured source, or the bundled sample photos (with a one-line notice) for dataset_name "sample"
    or an empty data_dir (TFDS names read TFDS's default data_dir then; the trainer requires data_dir)."""
    data_dir = _get(data_cfg, "data_dir", None)
    name = str(_get(data_cfg, "dataset_name", "coco"))
    if name == "sample" or (not data_dir and not name.startswith("tfds:")):
        return sample_source()
    return make_source(
        name,
        str(data_dir or ""),
        tfds_split=str(_get(data_cfg, "tfds_split", "train")),
        tfds_image_key=str(_get(data_cfg, "tfds_image_key", "image")),
    )


@dataclasses.dataclass(frozen=True)
class _Order:
    """Maps the k-th element this process yields to (epoch, dataset index); see the module docstring."""

    num_records: int
    batch_size: int
    steps_per_epoch: int
    process_index: int
    process_count: int
    seed: int
    shuffle: bool

    def __call__(self, k: int) -> tuple[int, int]:
        epoch, r = divmod(k, self.steps_per_epoch * self.batch_size)
        step, row = divmod(r, self.batch_size)
        position = (step * self.process_count + self.process_index) * self.batch_size + row
        if not self.shuffle:
            return epoch, position
        perm = grain.MapDataset.range(self.num_records).shuffle(seed=(self.seed + epoch) % 2**32)
        return epoch, int(perm[position])


class _MakeExample:
    """Worker-side transform: read + decode (skipping bad records) + NeCo views for element k."""

    def __init__(self, source, order: _Order, cfg: ViewConfig, seed: int, exif_transpose: bool):
        self.source, self.order, self.cfg, self.seed, self.exif = source, order, cfg, seed, exif_transpose

    def __call__(self, k: int, _unused) -> dict[str, np.ndarray]:
        epoch, index = self.order(k)
        n = len(self.source)
        errors = []
        for skipped in range(min(MAX_CONSECUTIVE_BAD, n)):
            used = (index + skipped) % n
            try:
                img = decode_rgb(self.source[used], exif_transpose=self.exif)
                break
            except (OSError, UndecodableImageError) as exc:
                errors.append(f"{self.source.describe(used)} ({exc})")
        else:
            raise DatasetError(
                f"{len(errors)} consecutive records could not be decoded, e.g. {'; '.join(errors[:3])}; "
                "check the data folder (corrupt copy? wrong dataset_name?)"
            )
        rng = np.random.default_rng([self.seed, epoch, index])
        example = make_views(img, rng, self.cfg)
        example["index"] = np.int64(used)
        example["skipped"] = np.int32(skipped)
        return example


class TrainLoader:
    """Iterator of NeCo batches with running bad-file counts and a JSON-serialisable state.

    Each batch is a dict of numpy arrays (B = per-process batch size, G/L = global/local crop counts, V = G+L):
      global_crops (B, G, Sg, Sg, 3) uint8 NHWC (data.augment_on="host": float32, colour applied, normalised)
      local_crops  (B, L, Sl, Sl, 3) uint8 (or float32, as global_crops)
      global_colour (B, G, 11) / local_colour (B, L, 11) float32  each crop's colour parameters, columns
                   input_pipeline.views.COLOUR_PARAMS (device mode only; input_pipeline.augment applies them)
      boxes_gc     (B, G, V, 4) float32  overlap of global g and crop v in g's resized frame, x1,y1,x2,y2 pixels
      boxes_all    (B, V, G, 4) float32  the same overlap in crop v's resized frame
      index        (B,) int64  dataset index of the image used
      skipped      (B,) int32  unreadable records skipped (and replaced by the next record) for this example
    Attributes: steps_per_epoch, num_records, bad_files and files_read (running totals, saved in the state).

    Batch n is a pure function of (seed, n), so the state is just the number of batches delivered: it does not
    depend on the worker count and a run may resume with different workers or threads.
    """

    def __init__(
        self,
        batches: grain.MapDataset,
        source,
        *,
        batch_size: int,
        steps_per_epoch: int,
        max_bad_fraction: float,
        worker_count: int,
        threads_per_worker: int,
        prefetch_batches: int,
    ):
        self._batches = batches
        self._iterator = None
        self._next_batch = 0
        self._read = grain.ReadOptions(
            num_threads=max(threads_per_worker, 1), prefetch_buffer_size=max(prefetch_batches, 1)
        )
        self._worker_count = worker_count
        self.source = source
        self.num_records = len(source)
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.max_bad_fraction = max_bad_fraction
        self.bad_files = 0
        self.files_read = 0
        self.recent_bad = collections.deque(maxlen=5)

    def _it(self):
        if self._iterator is None:
            ds = self._batches[self._next_batch :].to_iter_dataset(self._read)
            if self._worker_count > 0:
                if not flags.FLAGS.is_parsed():
                    flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
                ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._worker_count))
            self._iterator = iter(ds)
        return self._iterator

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.fetch()
        self.report(batch, self.get_state())
        return batch

    def fetch(self) -> dict[str, np.ndarray]:
        """The next batch, its unreadable records added to the running counts but not reported yet: for a
        consumer that fetches batches ahead (neco_jax.step_feed) and calls `report` when it takes each one."""
        batch = next(self._it())
        self._next_batch += 1
        skipped = batch["skipped"]
        n_bad = int(skipped.sum())
        self.files_read += len(skipped) + n_bad
        self.bad_files += n_bad
        return batch

    def report(self, batch: dict[str, np.ndarray], state: dict) -> None:
        """Warn naming each unreadable image that `batch` skipped, and stop once more than max_bad_fraction of
        the images read up to it (`state`: the loader state taken right after it) could not be decoded."""
        if not batch["skipped"].any():
            return
        for used, k in zip(batch["index"], batch["skipped"]):
            for j in range(int(k), 0, -1):
                name = self.source.describe((int(used) - j) % self.num_records)
                self.recent_bad.append(name)
                _log.warning("skipped unreadable image %s", name)
        bad, read = state["bad_files"], state["files_read"]
        if bad > self.max_bad_fraction * max(read, MIN_FILES_FOR_BAD_FRACTION):
            raise DatasetError(
                f"{bad} of {read} images read so far could not be decoded "
                f"(more than config.data.max_bad_fraction={self.max_bad_fraction}), e.g. "
                f"{', '.join(self.recent_bad)}; fix or remove them, or raise max_bad_fraction"
            )

    def close(self) -> None:
        """Stop worker processes and prefetch threads now (otherwise they stop when the loader is collected)."""
        if self._iterator is not None:
            self._iterator.close()

    def get_state(self) -> dict:
        """Where the next batch comes from, plus the running counts; JSON-serialisable."""
        return {"next_batch": self._next_batch, "bad_files": self.bad_files, "files_read": self.files_read}

    def set_state(self, state: dict) -> None:
        """Continue exactly after the batch at which `state` was taken (workers restart from there)."""
        self.close()
        self._iterator = None
        self._next_batch = int(state["next_batch"])
        self.bad_files = int(state["bad_files"])
        self.files_read = int(state["files_read"])


def make_train_loader(
    config,
    *,
    batch_size: int,
    seed: int,
    num_epochs: int | None = None,
    shuffle: bool = True,
    worker_count: int | None = None,
    threads_per_worker: int = 2,
    prefetch_batches: int = 2,
    process_index: int | None = None,
    process_count: int | None = None,
    source=None,
) -> TrainLoader:
    """Build the training loader.

    Args:
      config: the experiment ConfigDict (its `data` section is used) or the data section itself, or a dict.
        Keys read (original names, defaults = ViT-S/14 518 recipe): data_dir ("" -> bundled sample photos),
        dataset_name ("coco"; see input_pipeline.sources), tfds_split, tfds_image_key, size_crops,
        nmb_samples, min_scale_crops, max_scale_crops, min_intersection_crops, jitter_strength,
        blur_strength, jitter_prob, grayscale_prob, blur_prob, max_resample_tries, augment_on ("device"),
        num_workers (0), max_bad_fraction (0.01), exif_transpose (True); num_workers may also sit at the top
        level.
      batch_size: examples per batch on THIS process (global batch / process_count).
      seed: drives the per-epoch shuffle and every example's crops and colours.
      num_epochs: stop after this many epochs; None = repeat forever.
      shuffle: False reads the records in order (each epoch the same), e.g. for debugging.
      worker_count: grain worker processes (overrides data.num_workers); 0 = in this process.
      threads_per_worker: reader threads in each worker (PIL and NumPy release the GIL for most work).
      prefetch_batches: batches prepared ahead (per worker).
      process_index / process_count: this host's shard; default jax.process_index() / jax.process_count().
      source: use this random-access source instead of the configured one (tests, custom data).
    """
    data_cfg = _get(config, "data", None) or config
    if process_index is None or process_count is None:
        process_index, process_count = jax.process_index(), jax.process_count()
    if worker_count is None:  # the original keeps num_workers at the top level of its config
        worker_count = int(_get(data_cfg, "num_workers", _get(config, "num_workers", 0)))
    max_bad_fraction = float(_get(data_cfg, "max_bad_fraction", 0.01))
    if batch_size < 1 or worker_count < 0 or seed < 0 or not 0 <= max_bad_fraction <= 1:
        raise ConfigError(
            f"batch_size={batch_size} must be >= 1, num_workers={worker_count} >= 0, seed={seed} >= 0 and "
            f"max_bad_fraction={max_bad_fraction} in [0, 1]"
        )
    view_cfg = view_config_from(data_cfg)
    source = source if source is not None else source_from(data_cfg)
    n = len(source)
    steps_per_epoch = n // (batch_size * process_count)
    if steps_per_epoch == 0:
        raise DatasetError(
            f"the dataset has {n} images, fewer than one global batch ({batch_size} x {process_count} processes); "
            "lower the batch size or add data"
        )
    order = _Order(n, batch_size, steps_per_epoch, process_index, process_count, seed, shuffle)
    ds = grain.MapDataset.range(steps_per_epoch * batch_size)
    ds = ds.repeat(num_epochs)
    ds = ds.map_with_index(_MakeExample(source, order, view_cfg, seed, bool(_get(data_cfg, "exif_transpose", True))))
    ds = ds.batch(batch_size, drop_remainder=True)
    return TrainLoader(
        ds,
        source,
        batch_size=batch_size,
        steps_per_epoch=steps_per_epoch,
        max_bad_fraction=max_bad_fraction,
        worker_count=worker_count,
        threads_per_worker=threads_per_worker,
        prefetch_batches=prefetch_batches,
    )
