"""TFDS datasets prepared as ArrayRecord, read through `tfds.data_source` (random access, no TensorFlow).

The image field is read undecoded (`SkipDecoding`), so the bytes go through our own `decode_rgb` like files do
and a corrupt record is skipped and counted instead of failing inside TFDS.
"""

from __future__ import annotations

from input_pipeline.errors import DatasetError


class TfdsSource:
    """`source[i]` returns the encoded image of record i of `name` (e.g. "coco/2017") in `split`."""

    def __init__(self, name: str, *, data_dir: str | None, split: str = "train", image_key: str = "image"):
        import tensorflow_datasets as tfds  # TensorFlow: a slow import, only for tfds: datasets

        self.name, self.split, self.image_key = name, split, image_key
        try:
            builder = tfds.builder(name, data_dir=data_dir or None)
            features = builder.info.features
        except Exception as exc:  # tfds raises several types for unknown names / missing preparations
            raise DatasetError(
                f"TFDS dataset {name!r} could not be opened from data_dir {data_dir!r} ({exc}); prepare it with "
                "file_format='array_record' and point config.data.data_dir at its TFDS data_dir"
            ) from exc
        if image_key not in features:
            raise DatasetError(
                f"TFDS dataset {name!r} has no field {image_key!r} (fields: {', '.join(features.keys())}); "
                "set config.data.tfds_image_key"
            )
        if split not in builder.info.splits:
            raise DatasetError(
                f"TFDS dataset {name!r} has no split {split!r} (splits: {', '.join(builder.info.splits.keys())}); "
                "set config.data.tfds_split"
            )
        try:
            self._ds = builder.as_data_source(split=split, decoders={image_key: tfds.decode.SkipDecoding()})
        except Exception as exc:
            raise DatasetError(
                f"TFDS dataset {name!r} split {split!r} cannot be read by random access ({exc}); "
                "re-prepare it with file_format='array_record'"
            ) from exc
        if len(self._ds) == 0:
            raise DatasetError(f"TFDS dataset {name!r} split {split!r} is empty")

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int):
        return self._ds[index][self.image_key]

    def describe(self, index: int) -> str:
        return f"tfds:{self.name}[{self.split}][{index}]"

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, {len(self)} records)"
