"""The evaluation job: validate the config, run its protocol (`evaluation.protocols`), write results.

The runner writes `workdir/results.json` (the protocol's results dict plus the config) and `workdir/results.txt`
(tables).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import ml_collections

from evaluation import datasets as datasets_lib
from evaluation import protocols
from neco_jax.errors import ConfigError
from neco_jax.models.vit_config import DTYPES
from neco_jax.precision import true_float32


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks every field a user sets on the command line, with a message naming the field and the fix."""
    protocols.check_name(config.protocol)
    if config.dataset not in datasets_lib.DATASET_NAMES:
        raise ConfigError(
            f"config.dataset={config.dataset!r} is unknown; use one of {', '.join(datasets_lib.DATASET_NAMES)}"
        )
    for field in ("data_dir", "workdir", "checkpoint"):
        if not config.get(field):
            raise ConfigError(f"config.{field} is not set; pass --config.{field}=...")
    if config.dtype not in DTYPES:
        raise ConfigError(f"config.dtype={config.dtype!r}; use one of {DTYPES}")
    if config.checkpoint_model not in ("teacher", "student"):
        raise ConfigError(f"config.checkpoint_model={config.checkpoint_model!r}; use 'teacher' or 'student'")
    for field in ("image_size", "mask_size", "batch_size"):
        if config[field] <= 0:
            raise ConfigError(f"config.{field} must be positive, got {config[field]}")
    if config.num_images < 0:
        raise ConfigError(f"config.num_images must be >= 0 (0 = all), got {config.num_images}")


def format_results(results: dict) -> str:
    """A readable text version of a results dict: headline scalars, per-run rows, per-class IoU."""
    lines = []
    scalars = {k: v for k, v in results.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    width = max((len(k) for k in scalars), default=0)
    for k, v in scalars.items():
        shown = f"{100 * v:.2f} %" if k.startswith("miou") and isinstance(v, float) else v
        lines.append(f"{k:<{width}}  {shown}")
    runs = results.get("runs") or []
    if runs:
        cols = list(runs[0])
        cells = [[_cell(c, r.get(c)) for c in cols] for r in runs]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
        lines += ["", "  ".join(c.rjust(w) for c, w in zip(cols, widths))]
        lines += ["  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in cells]
    per_class = results.get("per_class_iou")
    if per_class is not None:
        names = results.get("class_names") or [str(i) for i in range(len(per_class))]
        w = max(len(n) for n in names)
        lines += ["", f"{'class':<{w}}  IoU %"]
        lines += [f"{n:<{w}}  {100 * v:6.2f}" for n, v in zip(names, per_class)]
    return "\n".join(lines) + "\n"


def _cell(name: str, value) -> str:
    if isinstance(value, float):
        return f"{100 * value:.2f}" if name.startswith("miou") else f"{value:.4g}"
    return str(value)


@true_float32  # float32 features are float32 on GPUs too; bf16 is config.dtype
def run_job(config: ml_collections.ConfigDict, model=None) -> dict:
    """Run the config's protocol on `model` (a backbone in memory; None: the one of `config.checkpoint`, which
    then only names it) and write results.json / results.txt into config.workdir."""
    validate(config)
    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    results = protocols.protocol(config.protocol).run(config, model)
    if "miou" not in results:
        raise RuntimeError(f"evaluation.{config.protocol}.run returned no 'miou'")
    results = {**results, "seconds": round(time.time() - start, 1)}
    (workdir / "results.json").write_text(json.dumps({**results, "config": config.to_dict()}, indent=2, default=_json))
    text = f"{config.protocol} on {config.dataset} ({config.checkpoint})\n\n" + format_results(results)
    (workdir / "results.txt").write_text(text)
    print(text, end="")
    return results


def _json(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
