"""Does a compiled step fit the device, and which rematerialisation makes it fit.

XLA's own account of a compiled program (`compiled.memory_analysis()`) gives, per device, the bytes of its
arguments, outputs and temporaries and the outputs that reuse donated arguments; the peak a run needs is
arguments + outputs + temporaries - aliased. The trainer compares it with the device's allocator limit
(`memory_stats()["bytes_limit"]`, where the backend reports one) before the first step, and `neco_jax.plan` with
a target's memory, so that a step that cannot fit ends in one line saying what would, never in an
out-of-memory error from inside the step.

`model.remat="auto"` tries, cheapest compute first, no rematerialisation, then the matmul-saving policy
("dots": the blocks keep their matmul outputs and recompute the elementwise work), then full remat (keep
nothing, about one more forward pass), and takes the first that fits.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)

REMAT_CHOICES = ("none", "dots", "full")  # cheapest compute first
REMAT_VALUES = ("auto", *REMAT_CHOICES)
# What each choice sets in the ViTConfig (neco_jax/models/vit.py).
REMAT_FIELDS = {
    "none": {},
    "dots": {"remat": True, "remat_policy": "dots_with_no_batch_dims_saveable"},
    "full": {"remat": True},
}
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Bytes per device of one compiled program, from XLA's buffer assignment."""

    arguments: int
    outputs: int
    temporaries: int
    aliased: int  # outputs written into donated arguments

    @property
    def peak(self) -> int:
        return self.arguments + self.outputs + self.temporaries - self.aliased

    @classmethod
    def of(cls, compiled) -> StepMemory:
        m = compiled.memory_analysis()
        return cls(
            int(m.argument_size_in_bytes),
            int(m.output_size_in_bytes),
            int(m.temp_size_in_bytes),
            int(m.alias_size_in_bytes),
        )

    def to_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "peak": self.peak}


def device_limit(devices: Sequence[Any]) -> int | None:
    """The smallest allocator limit (bytes) among `devices`, or None where a backend reports none (the CPU)."""
    limits = []
    for device in devices:
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if not stats or "bytes_limit" not in stats:
            return None
        limits.append(int(stats["bytes_limit"]))
    return min(limits) if limits else None


@dataclasses.dataclass(frozen=True)
class Fit:
    """The outcome of `fit`: the choice taken (None: nothing fits), its program, and every choice tried."""

    remat: str | None
    compiled: Any  # None where the compiler itself refused the program as too big
    memory: StepMemory
    tried: tuple[tuple[str, StepMemory], ...]

    @property
    def fits(self) -> bool:
        return self.remat is not None


def fit(compile_with: Callable[[str], Any], remat: str, limit: int | None, extra: int = 0) -> Fit:
    """Compile with `compile_with(choice)` for each rematerialisation `remat` allows ("auto": all, cheapest
    first) until one needs at most `limit` bytes per device (`extra`: bytes the run holds beside the program,
    e.g. prefetched batches). With no limit the first choice is taken as it is. When none fits, the returned
    Fit has remat None and the last program tried."""
    tried = []
    for choice in REMAT_CHOICES if remat == "auto" else (remat,):
        try:
            compiled = compile_with(choice)
            memory = StepMemory.of(compiled)
        except Exception as err:  # noqa: BLE001 - only the compiler's own "does not fit" is a result
            need = compiler_refusal(err)
            if need is None:
                raise
            compiled, memory = None, StepMemory(0, 0, need, 0)
        tried.append((choice, memory))
        if limit is None or memory.peak + extra <= limit:
            return Fit(choice, compiled, memory, tuple(tried))
        log.info("model.remat=%s needs %.1f GiB per device, more than %.1f GiB", choice, memory.peak / GIB, limit / GIB)
    return Fit(None, compiled, memory, tuple(tried))


_REFUSAL = re.compile(r"RESOURCE_EXHAUSTED.*?temporaries \((\d+(?:\.\d+)?)([KMGT])\) exceeds")


def compiler_refusal(err: BaseException) -> int | None:
    """The bytes of temporaries a compiler that refuses a program too big for its device says it needs (the TPU
    compiler does: "RESOURCE_EXHAUSTED: ... HLO temporaries (21.60G) exceeds available HBM (15.75G)"), else None."""
    match = _REFUSAL.search(str(err))
    if match is None:
        return None
    return int(float(match.group(1)) * 1024 ** "KMGT".index(match.group(2)) * 1024)


def what_would_fit(result: Fit, limit: int, *, dtype: str, batch_size: int, devices: int, remat: str) -> list[str]:
    """Changes that would make the step fit, the estimated ones marked "about" (temporaries scale with the images
    per device; the parameters and optimizer state do not)."""
    choice, memory = result.tried[-1]
    out = []
    if remat != "auto" and choice != "full":
        out.append("model.remat=auto (rematerialise the blocks as needed)")
    if dtype == "float32":
        out.append("model.dtype=bfloat16")
    per_device = batch_size // devices
    fixed = memory.peak - memory.temporaries
    if fixed < limit and per_device > 1:
        images = math.floor(per_device * (limit - fixed) / memory.temporaries)
        if 1 <= images < per_device:
            out.append(f"optim.batch_size={images * devices} (about {images} images per device)")
    if fixed < limit:
        need = math.ceil(devices * memory.temporaries / (limit - fixed))
        if need > devices:
            out.append(f"about {need} devices at this batch")
    return out


def no_fit_message(result: Fit, limit: int, where: str, **config) -> str:
    """One line: the need per device, the device's memory, what was tried and what would fit."""
    memory = result.tried[-1][1]
    tried = ", ".join(f"model.remat={c}: {m.peak / GIB:.1f} GiB" for c, m in result.tried)
    remedies = what_would_fit(result, limit, **config)
    return (
        f"the training step needs {memory.peak / GIB:.1f} GiB per device ({memory.arguments / GIB:.1f} GiB "
        f"arguments, {memory.temporaries / GIB:.1f} GiB temporaries) and {where} has {limit / GIB:.1f} GiB "
        f"({tried}); what would fit: {'; '.join(remedies) if remedies else 'a device with more memory'}"
    )
