"""The devices `neco_jax.plan` compiles for, without having them.

GPUs are described by a GpuTargetConfig text proto kept beside this file (`gpu_specs/`, written from each chip's
published figures) and compiled by the CUDA plugin of JAX; TPU slices by their topology name, compiled by
libtpu. A GPU target may be prefixed by a count ("8xh100-80gb": eight of them, data-parallel).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

from neco_jax.errors import ConfigError, UserError

SPECS = Path(__file__).parent / "gpu_specs"
GIB = 2**30
# JAX preallocates this share of a GPU's memory for its allocator unless XLA_PYTHON_CLIENT_MEM_FRACTION says
# otherwise: the `bytes_limit` the trainer compares with.
JAX_GPU_MEMORY_FRACTION = 0.75
EXTRA_HINT = "install the planning extra: pip install 'neco-jax[plan]' (the CUDA plugin of JAX and libtpu)"


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str  # "cuda" or "tpu"
    topology: str  # "1x1x<n>" for GPUs, e.g. "v5e:2x4" for TPUs
    spec_file: str = ""  # GPUs: gpu_specs/<file>
    hbm_gib: float = 0.0  # TPUs: memory per chip (GPUs: from the spec)
    description: str = ""

    @property
    def attention_platform(self) -> str:
        return "gpu" if self.platform == "cuda" else self.platform

    def spec(self) -> str:
        return (SPECS / self.spec_file).read_text() if self.spec_file else ""

    def device_memory(self) -> int:
        """Bytes of memory per device (a GPU's as its spec gives it, a TPU chip's HBM)."""
        if self.platform == "cuda":
            return int(re.search(r"device_memory_size:\s*(\d+)", self.spec()).group(1))
        return int(self.hbm_gib * GIB)


_GPUS = {
    "h100-80gb": ("h100_80gb.txtpb", "NVIDIA H100 SXM 80GB"),
    "a100-80gb": ("a100_80gb.txtpb", "NVIDIA A100 SXM4 80GB"),
    "a100-40gb": ("a100_40gb.txtpb", "NVIDIA A100 SXM4 40GB"),
}
# Cloud TPU slices of one host: (topology, HBM GiB per chip). v5e and v6e: one chip per device; v5p: megacore.
# v5e: the 15.75 GiB of its 16 GiB that libtpu's compiler says are available; v5p, v6e: the published HBM.
_TPUS = {
    "tpu-v5e-4": ("v5e:2x2", 15.75),
    "tpu-v5e-8": ("v5e:2x4", 15.75),
    "tpu-v5p-8": ("v5p:2x2x1", 95),
    "tpu-v6e-4": ("v6e:2x2", 32),
    "tpu-v6e-8": ("v6e:2x4", 32),
}
NAMES = (*_GPUS, *_TPUS)


def get_target(name: str) -> Target:
    """The target named `name` ("h100-80gb", "8xa100-40gb", "tpu-v5e-8", ...)."""
    counted = re.fullmatch(r"(\d+)x(.+)", name)
    count, base = counted.groups() if counted else ("1", name)
    if base in _GPUS and int(count) >= 1:
        spec_file, description = _GPUS[base]
        return Target(name, "cuda", f"1x1x{int(count)}", spec_file=spec_file, description=description)
    if base in _TPUS and count == "1":
        topology, hbm = _TPUS[base]
        return Target(name, "tpu", topology, hbm_gib=hbm, description=f"TPU {topology}")
    raise ConfigError(f"unknown target {name!r}; choose one of {', '.join(NAMES)} (GPUs may be counted: 8xh100-80gb)")


def check_installed(target: Target) -> None:
    """One line naming the extra when what compiles for `target` is not installed."""
    need = ("jax_plugins.xla_cuda13", "jax_plugins.xla_cuda12") if target.platform == "cuda" else ("libtpu",)
    if not any(_importable(module) for module in need):
        what = "the CUDA plugin of JAX (jax-cuda13-plugin)" if target.platform == "cuda" else "libtpu"
        raise UserError(f"planning for {target.name} needs {what}, which is not installed; {EXTRA_HINT}")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False
