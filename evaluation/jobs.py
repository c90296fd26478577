"""Evaluation job configs by dataset and protocol: the files under configs/eval/, loaded by path as
`python -m evaluation --config=...` loads them, with field overrides, a check that their data is there, and the
folder that holds each dataset under a root.

The job config files are read as data, never imported (configs/ sits above this package: README "Layout"). They
live beside this package: in the repository, or in site-packages where configs/ is installed with it.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from pathlib import Path

from evaluation.datasets import DATASET_NAMES
from evaluation.job_inputs import open_split
from input_pipeline.sources import find_voc_folder
from neco_jax.errors import ConfigError

PACKAGES_ROOT = Path(__file__).resolve().parents[1]  # the folder holding evaluation/ and configs/
JOB_CONFIGS = PACKAGES_ROOT / "configs" / "eval"


def _has(root: Path, *parts: str) -> bool:
    return all((root / p).is_dir() for p in parts)


# dataset -> the folders that mark its data_dir (evaluation/datasets.py layouts).
_MARKERS = {
    "voc": lambda r: find_voc_folder(r) is not None,
    "coco_things": lambda r: _has(r, "images/val2017", "annotations/val2017"),
    "coco_stuff": lambda r: _has(r, "images/val2017", "annotations/stuff_annotations"),
    "ade20k": lambda r: _has(r, "ADEChallengeData2016") or _has(r, "images/validation", "annotations/validation"),
    "cityscapes": lambda r: _has(r, "leftImg8bit", "gtFine"),
}


def find_data_dir(dataset: str, root: Path) -> Path | None:
    """The folder holding `dataset` in its reader's layout: `root` itself or one of its sub-folders."""
    candidates = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    return next((c for c in candidates if _MARKERS[dataset](c)), None)


def job_configs(protocols: list[str]) -> list[tuple[str, str]]:
    """(protocol, dataset) of every job config file for the chosen protocols, in table order."""
    return [(p, d) for p in protocols for d in DATASET_NAMES if (JOB_CONFIGS / f"{d}_{p}.py").is_file()]


def load_config(protocol: str, dataset: str):
    return load_config_file(JOB_CONFIGS / f"{dataset}_{protocol}.py")


def load_config_file(path: str | os.PathLike):
    """The locked job config of an evaluation config file: a path, or one relative to PACKAGES_ROOT
    (`configs/eval/voc_linear.py` from any working directory)."""
    path = Path(path)
    if not path.is_file() and (PACKAGES_ROOT / path).is_file():
        path = PACKAGES_ROOT / path
    if not path.is_file():
        raise ConfigError(f"evaluation config {path} does not exist; use one of configs/eval/*.py")
    spec = importlib.util.spec_from_file_location(f"_eval_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def check_job_data(config) -> None:
    """Open the splits the job's protocol reads (overclustering: val only); a DatasetError names what is missing."""
    for split in [config.val_split] + ([] if config.protocol == "overcluster" else [config.train_split]):
        open_split(config, split)


def parse_overrides(pairs: list[str]) -> dict:
    """`field.sub=value` strings -> {field.sub: value}; values are Python literals where they parse, else text."""
    out = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r} is not FIELD=VALUE; e.g. --set=linear.epochs=5")
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
    return out


def _has_field(config, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True


def job_config(protocol, dataset, *, checkpoint, data_dir, workdir, overrides):
    config = load_config(protocol, dataset)
    values = {k: v for k, v in overrides.items() if _has_field(config, k)}
    values.update(checkpoint=checkpoint, data_dir=str(data_dir), workdir=str(workdir))
    try:
        config.update_from_flattened_dict(values)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ConfigError(f"cannot apply --set to {dataset}_{protocol}: {' '.join(str(e).split())}") from e
    return config
