"""FLOPs of a traced function: every matmul XLA is given, counted on its jaxpr (nothing runs).

`matmul_flops` counts 2 x MACs of each dot_general and convolution, sub-jaxprs included: a scan's body times its
length (the ViT's scanned blocks, the chunked attention), rematerialised recomputation as traced, a cond's
largest branch, a while loop's body once. Library kernels that are not dot_generals in the jaxpr (cuDNN's fused
attention) are not counted. Used by `neco_jax.plan` and, through `bench/flops.py`, by the benchmarks and tests.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np


def _dot_macs(eqn) -> float:
    lhs, rhs = (v.aval.shape for v in eqn.invars)
    (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
    shared = np.prod([rhs[i] for i in (*rhs_contract, *rhs_batch)], dtype=np.float64)
    return float(np.prod(lhs, dtype=np.float64) * np.prod(rhs, dtype=np.float64) / shared)


def _conv_macs(eqn) -> float:
    out = eqn.outvars[0].aval.shape
    kernel = eqn.invars[1].aval.shape
    out_features = kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
    return float(np.prod(out, dtype=np.float64) * np.prod(kernel, dtype=np.float64) / out_features)


def _jaxpr_macs(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_macs(eqn)
        elif name == "conv_general_dilated":
            total += _conv_macs(eqn)
        elif name == "cond":  # the most expensive branch
            total += max(_jaxpr_macs(b.jaxpr) for b in eqn.params["branches"])
        else:
            times = eqn.params.get("length", 1) if name == "scan" else 1
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        total += times * _jaxpr_macs(inner)
    return total


def matmul_flops(fn: Callable, *args, **kwargs) -> float:
    """FLOPs (2 x MACs) of every dot_general and convolution in `fn`'s jaxpr, sub-jaxprs included (a scan's
    body times its length, a cond's largest branch; a while loop's body once). Tracing only: nothing runs."""
    return 2.0 * _jaxpr_macs(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)
