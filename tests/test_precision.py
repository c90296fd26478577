"""float32 is float32: training and evaluation trace every matmul and convolution at HIGHEST precision (JAX's
DEFAULT is TF32 on GPUs), while a bfloat16 model keeps bf16 operands."""

import re

import jax
import jax.numpy as jnp
from flax import nnx

from evaluation import runner
from neco_jax import train
from neco_jax.models import VisionTransformer, get_arch
from neco_jax.precision import true_float32


def _matmul_lines(dtype: str, wrapped: bool) -> list[str]:
    model = VisionTransformer(get_arch("vit_tiny_test", dtype=dtype), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)["x_norm_patchtokens"])

    def lower():
        return forward.lower(state, jnp.zeros((1, 28, 28, 3))).as_text()

    with jax.default_matmul_precision("default"):  # JAX's own default (tests/conftest.py sets "highest")
        text = true_float32(lower)() if wrapped else lower()
    return [line for line in text.splitlines() if re.search(r"stablehlo\.(dot_general|convolution)", line)]


# The patch embedding and the six matmuls of a block (qkv, q k^T, attention x v, proj, fc1, fc2): the blocks
# run under one scan, so the StableHLO text holds one block's matmuls whatever the depth.
MATMULS = 7


def test_float32_forward_is_highest_precision_only_under_true_float32():
    wrapped = _matmul_lines("float32", True)
    assert len(wrapped) >= MATMULS and all("HIGHEST" in line and "DEFAULT" not in line for line in wrapped)
    assert any("DEFAULT" in line for line in _matmul_lines("float32", False))  # what JAX would do by itself


def test_bfloat16_is_the_fast_option():
    lines = _matmul_lines("bfloat16", True)
    assert sum("bf16" in line for line in lines) >= MATMULS  # the block matmuls take bf16 operands


def test_training_and_evaluation_entry_points_run_under_true_float32():
    wrapper_code = true_float32(print).__code__
    assert train.train_and_evaluate.__code__ is wrapper_code
    assert runner.run_job.__code__ is wrapper_code

    @true_float32
    def probe():
        return jax.config.jax_default_matmul_precision

    with jax.default_matmul_precision("default"):
        assert probe() == "highest" and jax.config.jax_default_matmul_precision == "default"
