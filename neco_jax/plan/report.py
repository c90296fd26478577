"""A plan's results (neco_jax.plan.compile) as lines a person reads."""

from __future__ import annotations

from neco_jax.plan.targets import GIB


def _gib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / GIB:.1f} GiB"


def _si(n: float, unit: str) -> str:
    """1.23e12 -> "1.23 TFLOP" (decimal prefixes)."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}"


def describe(result: dict) -> str:
    """A result of neco_jax.plan.compile as a few readable lines."""
    mem = result["memory"]
    head = (
        f"{result['target']}: {result['devices']} x {result['device_kind']}, {_gib(result['limit_bytes'])} usable per "
        f"device ({result['memory_share']:.0%} of {_gib(result['device_memory_bytes'])})"
    )
    what = (
        f"{result['job']}: batch {result['batch_size']} ({result['images_per_device']} per device), {result['dtype']}"
    )
    if "attention" in result:
        what += f", attention {result['attention']}, model.remat={result['remat']}"
    lines = [head, f"  {what}"]
    for t in result.get("tried", []):
        lines.append(
            f"    remat {t['remat']}: arguments {_gib(t['arguments'])}, temporaries {_gib(t['temporaries'])}, peak "
            f"{_gib(t['peak'])}: {'fits' if t['fits'] else 'does not fit'}"
        )
    if "tried" not in result:
        lines.append(
            f"    arguments {_gib(mem['arguments'])}, temporaries {_gib(mem['temporaries'])}, peak {_gib(mem['peak'])}"
        )
    verdict = "FITS" if result["fits"] else "DOES NOT FIT"
    if result.get("remat_chosen"):
        verdict += f" with model.remat={result['remat_chosen']}"
    lines.append(f"    {verdict}: peak {_gib(mem['peak'])} per device of {_gib(result['limit_bytes'])}")
    seconds = result["xla_estimated_seconds"]
    xla_flops = result["xla_flops"]
    lines.append(
        f"    FLOPs: {_si(result['matmul_flops'], 'FLOP')} of matmuls traced"
        + (f", XLA's count {_si(xla_flops, 'FLOP')} per device" if xla_flops else "")
        + (f"; HLO traffic {_si(result['hlo_traffic_bytes'], 'B')} per device" if result["hlo_traffic_bytes"] else "")
        + f"; estimated step time {'n/a (the compiler gives none)' if seconds is None else f'{seconds:.3f} s'}"
        + f"; compiled in {result['compile_s']:.0f} s"
    )
    return "\n".join(lines)
