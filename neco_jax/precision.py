"""float32 means float32: matmul precision for training and evaluation.

On GPUs, JAX computes float32 matmuls and convolutions at its "default" precision, which there is TF32
(operands rounded to a 10-bit mantissa); PyTorch, which the original code and its numbers come from, computes
float32 matmuls in full float32 by default (``torch.backends.cuda.matmul.allow_tf32 = False`` since 1.12).
Everything run under ``true_float32`` therefore traces with ``jax.default_matmul_precision("highest")``: a
float32 config computes in float32 on every backend. The fast option is explicit, the bfloat16 compute dtype
(``config.model.dtype`` / ``config.dtype``), whose bf16 operands this setting does not touch. CPUs compute
float32 matmuls in full precision either way.
"""

from __future__ import annotations

import functools

import jax


def true_float32(fn):
    """``fn`` run with float32 matmuls and convolutions at full precision (traced and called alike)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with jax.default_matmul_precision("highest"):
            return fn(*args, **kwargs)

    return wrapper
