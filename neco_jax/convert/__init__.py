"""Weight conversion between PyTorch ViT checkpoints and neco_jax's NNX models.

Into JAX: DINOv2 hub and timm state dicts, NeCo's released files and its Lightning training checkpoints
(student, teacher and both projection heads), as .pth/.pt/.ckpt/.safetensors. Out of JAX: the DINOv2 hub layout
or timm's, as .pth or .safetensors. Hugging Face transformers folders go both ways.

    weight_files.py  every ViT in a weight file (read_checkpoint), a backbone written as a file (export_file)
    backbone.py      a backbone state dict <-> NNX parameters, and its architecture (named, recorded, inferred)
    head.py          NeCo's projection head <-> NNX parameters
    params.py        the abstract model of a ViTConfig or HeadConfig, parameter shapes, '/'-joined parameter paths
    keymap.py        PyTorch key <-> NNX path, per layout;  infer.py  architecture fields from the shapes
    arch_record.py   the architecture recorded in every export;  torch_io.py  reading and writing the files
    hf.py            Hugging Face transformers folders;  __main__.py  the command line (python -m neco_jax.convert)

The names most callers need are re-exported here.
"""

from neco_jax.convert.backbone import backbone_to_jax, config_for, export_state_dict, resolve_arch
from neco_jax.convert.head import head_config_for, head_to_jax, head_to_torch
from neco_jax.convert.params import (
    HeadConfig,
    abstract_module,
    flat_params,
    flatten_params,
    join_path,
    param_shapes,
    unflatten_params_like,
)
from neco_jax.convert.weight_files import Converted, export_file, read_checkpoint

__all__ = [
    "Converted",
    "HeadConfig",
    "abstract_module",
    "backbone_to_jax",
    "config_for",
    "export_file",
    "export_state_dict",
    "flat_params",
    "flatten_params",
    "head_config_for",
    "head_to_jax",
    "head_to_torch",
    "join_path",
    "param_shapes",
    "read_checkpoint",
    "resolve_arch",
    "unflatten_params_like",
]
