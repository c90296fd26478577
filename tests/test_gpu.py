"""Checks that need an accelerator (run by bench/gpu_check.sh; skipped without a GPU by conftest).

fp32 parity: the same random weights and inputs on the CPU and on the GPU, with matmul precision "highest"
(conftest), must agree to the fp32 tolerances of the project (forward 1e-5, gradients 1e-4, norm-wise
relative). bf16 sanity: bf16 compute is close to fp32 within a loose bound, and a bf16 train step of the
real ViT-S/14 stays finite and moves the weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bench.step_cases import Case, build_step, case_config, synthetic_batch
from neco_jax import sharding
from neco_jax import step as step_lib
from neco_jax.models import VisionTransformer, get_arch
from neco_jax.models import attention as attention_lib

pytestmark = pytest.mark.gpu

# bf16 keeps 8 significant bits (unit roundoff 2^-9 ~ 2e-3). Each of ViT-S's 12 blocks rounds the inputs of
# its 4 matmuls and the rounding errors add up roughly like a random walk: 5e-3 norm-wise relative error was
# measured on the CPU (random weights, 224 px). 3e-2 leaves a 6x margin and still catches a broken bf16 path
# (wrong casts, low-precision softmax or LayerNorm give errors of order 1). Per-token cosine likewise.
BF16_REL_BOUND = 3e-2
BF16_MIN_COSINE = 0.999


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def accelerator():
    return next(d for d in jax.devices() if d.platform != "cpu")


def vit_patch_tokens(arch: str, dtype: str, device, images: np.ndarray) -> np.ndarray:
    """Final-norm patch tokens of a random-init (seed 0) ViT, computed on `device`."""
    model = VisionTransformer(get_arch(arch, dtype=dtype), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    params, x = jax.device_put((params, jnp.asarray(images)), device)
    out = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)["x_norm_patchtokens"])(params, x)
    assert next(iter(out.devices())) == device
    return np.asarray(out)


def loss_and_grads(config, device):
    """The trainer's loss and its gradients w.r.t. the student, one batch, everything placed on `device`."""
    mesh = sharding.make_mesh([device])
    built = build_step(config, mesh)
    batch = sharding.global_batch(synthetic_batch(config, np.random.default_rng(0)), mesh)
    loss_fn = step_lib.make_loss_fn(built.settings, built.training.models, built.training.labels)
    state = built.training.state
    (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        state.student, state.teacher, state.queue, batch, jax.random.PRNGKey(7)
    )
    return float(loss), jax.device_get(grads)


def check_forward_parity(device) -> None:
    images = np.random.default_rng(0).standard_normal((2, 224, 224, 3)).astype(np.float32)
    cpu = vit_patch_tokens("vit_small_patch14_dinov2", "float32", jax.devices("cpu")[0], images)
    acc = vit_patch_tokens("vit_small_patch14_dinov2", "float32", device, images)
    assert rel_err(acc, cpu) <= 1e-5


def check_loss_grad_parity(device) -> None:
    # The demo recipe's tiny ViT with the recipes' loss: 7x7 ROI-align, 49-element bitonic sorts, the queue.
    config = case_config(Case("demo", (56, 28), 2, "float32"))
    config.loss.roi_align_kernel_size = 7
    loss_cpu, grads_cpu = loss_and_grads(config, jax.devices("cpu")[0])
    loss_acc, grads_acc = loss_and_grads(config, device)
    assert np.isfinite(loss_cpu) and abs(loss_acc - loss_cpu) <= 1e-5 * abs(loss_cpu)
    flat_cpu, flat_acc = jax.tree.leaves(grads_cpu), jax.tree.leaves(grads_acc)
    total = np.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in flat_cpu))
    assert total > 0
    for g_cpu, g_acc in zip(flat_cpu, flat_acc):
        if np.linalg.norm(g_cpu) > 1e-6 * total:  # leaves with a gradient (the frozen mask token has none)
            assert rel_err(g_acc, g_cpu) <= 1e-4


def check_bf16_forward(device) -> None:
    images = np.random.default_rng(1).standard_normal((4, 224, 224, 3)).astype(np.float32)
    fp32 = vit_patch_tokens("vit_small_patch14_dinov2", "float32", device, images).astype(np.float64)
    bf16 = vit_patch_tokens("vit_small_patch14_dinov2", "bfloat16", device, images).astype(np.float64)
    assert rel_err(bf16, fp32) <= BF16_REL_BOUND
    cos = (bf16 * fp32).sum(-1) / np.linalg.norm(bf16, axis=-1) / np.linalg.norm(fp32, axis=-1)
    assert cos.min() >= BF16_MIN_COSINE


def check_bf16_train_step(device, steps: int = 3) -> None:
    # ViT-S/14 widths (4 of its 12 blocks, to keep the compile short: bench/train_step.py runs and checks the
    # full model) at the 224/98 recipe's crops, bf16 compute, a few steps.
    config = case_config(Case("dinov2_s14", (224, 98), 4, "bfloat16"))
    config.model.arch_overrides.depth = 4
    mesh = sharding.make_mesh([device])
    built = build_step(config, mesh)
    step = built.compile(mesh)
    state, sums = built.training.state, built.sums
    before = jax.device_get(state.student)
    for i in range(steps):
        batch = sharding.global_batch(synthetic_batch(config, np.random.default_rng(i)), mesh)
        state, metrics, sums = step(state, batch, sums, built.training.schedules)
        metrics = jax.device_get(metrics)
        assert metrics["finite"] and np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    after = jax.device_get(state.student)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(after))
    moved = [float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before))]
    assert max(moved) > 0


def test_vit_forward_fp32_matches_cpu():
    check_forward_parity(accelerator())


def test_loss_and_gradients_fp32_match_cpu():
    check_loss_grad_parity(accelerator())


def test_bf16_forward_close_to_fp32():
    check_bf16_forward(accelerator())


def test_bf16_train_step_is_finite():
    check_bf16_train_step(accelerator())


def _attention_and_grads(implementation: str, q, k, v, cotangent) -> list[np.ndarray]:
    def f(q, k, v):
        out = attention_lib.dot_product_attention(q, k, v, scale=0.125, implementation=implementation)
        return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32)), out

    (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return [np.asarray(a, np.float32) for a in (out, *grads)]


def check_cudnn_attention(device) -> None:
    """model.attention="auto" on a GPU in bf16 is cuDNN's flash attention (odd token counts padded by one masked
    token): outputs and gradients close to XLA's plain path on the same bf16 inputs."""
    for n in (17, 18, 257):
        keys = jax.random.split(jax.random.PRNGKey(n), 4)
        q, k, v, ct = (jax.device_put(jax.random.normal(key, (2, n, 6, 64), jnp.bfloat16), device) for key in keys)
        assert attention_lib.resolve("auto", jnp.bfloat16, n) == "cudnn"
        for got, want in zip(_attention_and_grads("auto", q, k, v, ct), _attention_and_grads("xla", q, k, v, ct)):
            assert rel_err(got, want) <= BF16_REL_BOUND


def test_cudnn_attention_close_to_plain_path():
    check_cudnn_attention(accelerator())
