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
from input_pipeline.settings import LoaderSettings
from input_pipeline.sources import make_source
from input_pipeline.views import ViewSettings, make_views

_log = logging.getLogger(__name__)
MIN_FILES_FOR_BAD_FRACTION = 100
MAX_CONSECUTIVE_BAD = 20
PREFETCH_BATCHES = 2  # batches each reader prepares ahead


def source_from(settings: LoaderSettings):
    """The configured source, or the bundled sample photos (with a one-line notice) for dataset_name "sample"
    or an empty data_dir (TFDS names read TFDS's default data_dir then; the trainer requires data_dir)."""
    name = settings.dataset_name
    if name == "sample" or (not settings.data_dir and not name.startswith("tfds:")):
        return sample_source()
    return make_source(name, settings.data_dir, tfds_split=settings.tfds_split, tfds_image_key=settings.tfds_image_key)


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

    def __init__(self, source, order: _Order, cfg: ViewSettings, seed: int, exif_transpose: bool):
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
        self, batches: grain.MapDataset, source, *, batch_size: int, steps_per_epoch: int, settings: LoaderSettings
    ):
        self._batches = batches
        self._iterator = None
        self._next_batch = 0
        self._read = grain.ReadOptions(
            num_threads=max(settings.threads_per_worker, 1), prefetch_buffer_size=PREFETCH_BATCHES
        )
        self._worker_count = settings.num_workers
        self.source = source
        self.num_records = len(source)
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.max_bad_fraction = settings.max_bad_fraction
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
        consumer that fetches batches ahead (neco_jax.device_feed) and calls `report` when it takes each one."""
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
    views: ViewSettings,
    settings: LoaderSettings,
    *,
    batch_size: int,
    seed: int,
    process: tuple[int, int] | None = None,
    num_epochs: int | None = None,
    shuffle: bool = True,
    source=None,
) -> TrainLoader:
    """The training loader of `views` (each image's crops and colours) over the images `settings` names.

    Args:
      views, settings: the data section's two settings (`config.data`; its `num_workers` grain worker
        processes, 0 = in this process, and `threads_per_worker` reader threads in each).
      batch_size: examples per batch on THIS process (global batch / process count).
      seed: drives the per-epoch shuffle and every example's crops and colours.
      process: (index, count) of this host's shard; default (jax.process_index(), jax.process_count()).
      num_epochs: stop after this many epochs; None = repeat forever.
      shuffle: False reads the records in order (each epoch the same), e.g. for debugging.
      source: use this random-access source instead of the configured one (tests, custom data).
    """
    process_index, process_count = process or (jax.process_index(), jax.process_count())
    if batch_size < 1 or seed < 0:
        raise ConfigError(f"batch_size={batch_size} must be >= 1 and seed={seed} >= 0")
    source = source if source is not None else source_from(settings)
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
    ds = ds.map_with_index(_MakeExample(source, order, views, seed, settings.exif_transpose))
    ds = ds.batch(batch_size, drop_remainder=True)
    return TrainLoader(ds, source, batch_size=batch_size, steps_per_epoch=steps_per_epoch, settings=settings)
