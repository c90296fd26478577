"""Command line: move ViT weights between PyTorch files and neco_jax folders.

    python -m neco_jax.convert to-jax SRC --out=FOLDER [--arch=NAME] [--allow_nonfinite]
    python -m neco_jax.convert to-torch FOLDER --out=FILE.pth|FILE.safetensors --layout=dinov2|timm
    python -m neco_jax.convert to-torch FOLDER --out=HF_FOLDER --layout=hf

The subcommand and its input are the two positional arguments; everything else is a flag (`--out FOLDER` works
too). A flag of the other subcommand is refused.

SRC is a .pth/.pt/.ckpt/.safetensors file, a URL, a known pretrained name, or a Hugging Face
transformers DINOv2 folder (``--layout=hf`` writes one: config.json + model.safetensors). A NeCo training
checkpoint (student and teacher) becomes FOLDER/student and FOLDER/teacher. Every output records
the architecture (FOLDER/config.json; the ViTConfig inside an exported file), and no output
overwrites an existing file. Mistakes in the input print one line on stderr and exit with status 2; so do
weights holding NaN or infinity, unless ``--allow_nonfinite`` converts them anyway (with a warning).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from absl import flags

from neco_jax import backbone_io, program
from neco_jax.convert import hf, keymap
from neco_jax.convert.weight_files import export_file, read_checkpoint
from neco_jax.errors import NonFiniteError, UserError

_OUT = flags.DEFINE_string(
    "out", None, "to-jax: output folder; to-torch: output .pth, .pt or .safetensors file (a folder for --layout=hf)."
)
_ARCH = flags.DEFINE_string(
    "arch", None, "to-jax: architecture name (neco_jax.models.get_arch); recorded or inferred when omitted."
)
_LAYOUT = flags.DEFINE_enum(
    "layout",
    None,
    list(keymap.LAYOUTS) + [hf.LAYOUT],
    "to-torch: key layout of the output (hf: a transformers folder).",
)
_ALLOW_NONFINITE = flags.DEFINE_bool(
    "allow_nonfinite",
    False,
    "to-jax: convert weights that hold NaN or infinity (refused otherwise; a warning names them).",
)
USAGE = "python -m neco_jax.convert to-jax SRC --out=FOLDER | to-torch FOLDER --out=FILE --layout=dinov2|timm|hf"


def _describe(converted) -> str:
    n = sum(v.size for v in converted.params.values())
    head = f", projection head -> {converted.head_config.out_dim}" if converted.head_config else ""
    cfg = converted.config.to_dict()
    return (
        f"{n / 1e6:.1f}M parameters, dim {cfg['embed_dim']}, depth {cfg['depth']}, "
        f"patch {cfg['patch_size']}, {cfg['num_register_tokens']} registers{head}"
    )


def _check_finite(parts: dict, source: str, allow: bool) -> None:
    """Refuse weights with NaN or infinity, naming the tensors (training and evaluation refuse them too);
    ``allow`` converts them anyway, with a warning on stderr."""
    bad = [
        f"{name}: {path}" if len(parts) > 1 else path
        for name, converted in parts.items()
        for path, value in {
            **converted.params,
            **{f"head/{k}": v for k, v in (converted.head_params or {}).items()},
        }.items()
        if not np.isfinite(value).all()
    ]
    if not bad:
        return
    shown = ", ".join(bad[:8]) + (f" ... (+{len(bad) - 8} more)" if len(bad) > 8 else "")
    what = f"{source} holds NaN or infinite values in {len(bad)} tensor(s): {shown}"
    if not allow:
        raise NonFiniteError(
            f"{what}; training and evaluation refuse such weights. Convert an intact checkpoint, or pass "
            "--allow_nonfinite to convert these anyway"
        )
    print(f"warning: {what}; converted anyway (--allow_nonfinite)", file=sys.stderr, flush=True)


def to_jax(source: str, out: Path, arch: str | None, allow_nonfinite: bool = False) -> None:
    if Path(source).is_dir() and not hf.is_hf_folder(source):
        raise UserError(
            f"{source} is a folder but no transformers DINOv2 folder; to-jax reads a weight file, a URL, "
            "a known pretrained name or a folder with a transformers config.json"
        )
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is an existing file; to-jax writes a folder: choose another name")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(
            f"--out {out} is a folder that is not empty; to-jax writes only into a new or empty folder, "
            "so nothing there is overwritten: choose another name or remove it"
        )
    if Path(source).is_dir():
        parts = {"backbone": hf.read_folder(source, arch)}
    else:
        path, resolved_arch = backbone_io.locate(source, arch)
        parts = read_checkpoint(path, resolved_arch)
    _check_finite(parts, source, allow_nonfinite)
    for name, converted in parts.items():
        folder = out if len(parts) == 1 else out / name
        backbone_io.save_converted(converted, folder)
        print(f"wrote {folder} ({name}: {_describe(converted)})")


def to_torch(folder: Path, out: Path, layout: str) -> None:
    if out.exists():
        raise UserError(
            f"--out {out} already exists; to-torch never overwrites a file: choose another name or remove it first"
        )
    converted = backbone_io.load_converted(folder)
    if layout == hf.LAYOUT:
        notes = hf.write_folder(converted, out)
        print(f"wrote {out} (transformers {hf.CONFIG_FILE} + {hf.WEIGHTS_FILE}{''.join('; ' + n for n in notes)})")
        return
    export_file(converted.config, converted.params, layout, out)
    dropped = keymap.dropped_paths(converted.params, layout)
    note = f"; left out, no place in the {layout} layout: {', '.join(dropped)}" if dropped else ""
    print(
        f"wrote {out} ({len(converted.params) - len(dropped)} tensors, {layout} layout, "
        f"architecture recorded in the file{note})"
    )


def main(argv: list[str]) -> None:
    if len(argv) != 3 or argv[1] not in ("to-jax", "to-torch"):
        raise UserError(f"expected a subcommand and its input, got {' '.join(argv[1:]) or 'nothing'}: {USAGE}")
    command, path = argv[1], argv[2]
    others = [_LAYOUT] if command == "to-jax" else [_ARCH, _ALLOW_NONFINITE]
    for other in others:
        if other.value not in (None, False):
            raise UserError(f"--{other.name} does not apply to {command}: {USAGE}")
    if _OUT.value is None:
        raise UserError(f"{command} needs --out: {USAGE}")
    out = Path(_OUT.value)
    if command == "to-jax":
        to_jax(path, out, _ARCH.value, _ALLOW_NONFINITE.value)
    elif _LAYOUT.value is None:
        raise UserError(f"to-torch needs --layout=dinov2, timm or hf: {USAGE}")
    else:
        to_torch(Path(path), out, _LAYOUT.value)


if __name__ == "__main__":
    program.run(main)
