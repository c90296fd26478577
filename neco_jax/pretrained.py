"""Known pretrained backbones: name -> official download URL and architecture, and a download cache.

DINOv2 hub files (facebookresearch/dinov2, ``dinov2/hub/backbones.py``), DINO hub files
(facebookresearch/dino, ``hubconf.py``) and every released NeCo checkpoint of the NeCo README
(Hugging Face ``FunAILab/NeCo``; ``*_model.ckpt`` is the student, ``*_teacher.ckpt`` the EMA teacher).

Interpolation of the position table is not visible in the weights, so each entry says which rule
its model was run with: the DINOv2 hub's register models use antialias and offset 0; NeCo trained
and evaluated every model, registers included, with offset 0.1 and no antialias (its ``vit_v2.py``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from neco_jax.errors import DownloadError, UserError

CACHE_ENV = "NECO_JAX_CACHE"
_DINOV2 = "https://dl.fbaipublicfiles.com/dinov2"
_DINO = "https://dl.fbaipublicfiles.com/dino"
_NECO = "https://huggingface.co/FunAILab/NeCo/resolve/main"
_HUB_REGISTER_RULE = {"interpolate_offset": 0.0, "interpolate_antialias": True}


@dataclass(frozen=True)
class Pretrained:
    """One downloadable backbone: where it lives and which architecture reads it."""

    url: str
    arch: str
    overrides: dict[str, Any] = field(default_factory=dict)


def _dinov2_entries() -> dict[str, Pretrained]:
    sizes = {"s": "small", "b": "base", "l": "large", "g": "giant"}
    table = {}
    for letter, size in sizes.items():
        stem = f"dinov2_vit{letter}14"
        table[stem] = Pretrained(f"{_DINOV2}/{stem}/{stem}_pretrain.pth", f"vit_{size}_patch14_dinov2")
        table[f"{stem}_reg"] = Pretrained(
            f"{_DINOV2}/{stem}/{stem}_reg4_pretrain.pth", f"vit_{size}_patch14_reg4_dinov2", _HUB_REGISTER_RULE
        )
    return table


def _dino_entries() -> dict[str, Pretrained]:
    files = {
        "dino_vits16": ("dino_deitsmall16_pretrain", "vit_small_patch16_dino"),
        "dino_vits8": ("dino_deitsmall8_pretrain", "vit_small_patch8_dino"),
        "dino_vitb16": ("dino_vitbase16_pretrain", "vit_base_patch16_dino"),
        "dino_vitb8": ("dino_vitbase8_pretrain", "vit_base_patch8_dino"),
    }
    return {name: Pretrained(f"{_DINO}/{stem}/{stem}.pth", arch) for name, (stem, arch) in files.items()}


def _neco_entries() -> dict[str, Pretrained]:
    # (our name, Hugging Face folder, file stem, architecture): one row of the NeCo README table each.
    rows = [
        ("neco_dinov2_vits14", "vit-small/dinov2-architectures", "neco_on_dinov2_vit14", "vit_small_patch14_dinov2"),
        (
            "neco_dinov2r_xr_vits14",
            "vit-small/dinov2-architectures",
            "neco_on_dinov2r_xr_vit14",
            "vit_small_patch14_dinov2",
        ),  # XR: trained with the registers removed
        (
            "neco_dinov2r_vits14",
            "vit-small/dinov2-architectures",
            "neco_on_dinov2r_vit14",
            "vit_small_patch14_reg4_dinov2",
        ),
        ("neco_dinov2_vitb14", "vit-base/dinov2-architectures", "neco_on_dinov2_vit14", "vit_base_patch14_dinov2"),
        (
            "neco_dinov2r_xr_vitb14",
            "vit-base/dinov2-architectures",
            "neco_on_dinov2r_xr_vit14",
            "vit_base_patch14_dinov2",
        ),
        (
            "neco_dinov2r_vitb14",
            "vit-base/dinov2-architectures",
            "neco_on_dinov2r_vit14",
            "vit_base_patch14_reg4_dinov2",
        ),
        ("neco_dino_vits16", "vit-small/dino-architectures", "neco_on_dino_vit16", "vit_small_patch16_dino"),
        (
            "neco_timetuning_vits16",
            "vit-small/dino-architectures",
            "neco_on_timetuning_vit16",
            "vit_small_patch16_dino",
        ),
        ("neco_leopart_vits16", "vit-small/dino-architectures", "neco_on_leopart_vit16", "vit_small_patch16_dino"),
    ]
    table = {}
    for name, folder, stem, arch in rows:
        table[name] = Pretrained(f"{_NECO}/{folder}/{stem}_model.ckpt", arch)
        table[f"{name}_teacher"] = Pretrained(f"{_NECO}/{folder}/{stem}_teacher.ckpt", arch)
    return table


PRETRAINED: dict[str, Pretrained] = {**_dinov2_entries(), **_dino_entries(), **_neco_entries()}


def get_pretrained(name: str) -> Pretrained:
    """The table entry for ``name``, or a UserError that lists the known names."""
    if name not in PRETRAINED:
        raise UserError(
            f"unknown pretrained name {name!r}; known names: {', '.join(sorted(PRETRAINED))} "
            "(or pass a local file, a folder from save_backbone, or a URL)"
        )
    return PRETRAINED[name]


def cache_dir() -> Path:
    """Where downloads are kept: $NECO_JAX_CACHE, else ~/.cache/neco_jax."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "neco_jax").expanduser()


def cached_path(name: str) -> Path:
    """The cache file for a known name (names differ where the upstream file names collide)."""
    suffix = Path(urllib.parse.urlparse(get_pretrained(name).url).path).suffix
    return cache_dir() / f"{name}{suffix}"


def _url_cache_path(url: str) -> Path:
    base = Path(urllib.parse.urlparse(url).path).name or "download"
    return cache_dir() / "urls" / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{base}"


def fetch(name_or_url: str) -> Path:
    """Local path of a known pretrained name or an http(s)/file URL, downloading it once."""
    if "://" in name_or_url:
        url, target, label = name_or_url, _url_cache_path(name_or_url), name_or_url
    else:
        url, target, label = get_pretrained(name_or_url).url, cached_path(name_or_url), name_or_url
    if not target.is_file():
        download(url, target, label=label)
    return target


def download(url: str, target: Path, *, label: str, timeout_s: float = 60.0) -> Path:
    """Stream ``url`` into ``target`` with a progress bar; the file appears only when complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {label}") as bar:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        bar.update(len(chunk))
                if total is not None and bar.n != total:
                    raise OSError(f"connection closed after {bar.n} of {total} bytes")
        os.replace(tmp, target)
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise DownloadError(
            f"could not download {label} from {url} ({reason}). If this machine is offline, fetch that "
            f"URL elsewhere and place the file at {target} (the cache, set by ${CACHE_ENV}), "
            "or pass the local file path instead of the name"
        ) from err
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target
