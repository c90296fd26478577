"""Softmax attention that does not keep the N x N scores for the backward pass.

`jax.nn.dot_product_attention` with no implementation named takes XLA's path: it materialises the scores and the
probabilities of every block and keeps both for the backward pass (at DINOv2's 518 px, 1370 tokens, most of a
training step's memory and memory traffic). The implementations a ViT can be given (`ViTConfig.attention`):

- "xla": that path, unchanged (the reference the others are tested against).
- "chunked": exact, in JAX, anywhere: the queries in blocks of at most `chunk` rows, each block's softmax rows
  computed whole by the XLA path and the block under `jax.checkpoint` inside a scan, so the backward pass
  recomputes one block's scores from q, k, v instead of keeping them (what stays is q, k, v and the output).
- "cudnn": cuDNN's flash attention (`implementation="cudnn"`), NVIDIA GPUs with 16-bit inputs.
- "auto": "cudnn" for 16-bit inputs on a GPU; on the CPU "xla" while all queries fit in one chunk (the small
  sizes of the demo and the tests, where recomputing would only cost time); "chunked" everywhere else.

Where cuDNN cannot serve a call (float32 inputs, a head size it lacks, no cuDNN in the install), the call falls
back to "chunked" and says why once per reason. The platform is the default backend's, or the one set by
`compiling_for` while a program is traced for a device this machine lacks (`neco_jax.plan`).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging

import jax
import jax.numpy as jnp

from neco_jax.models.vit_config import ATTENTION_CHUNK, ATTENTION_IMPLEMENTATIONS

log = logging.getLogger(__name__)

_SIXTEEN_BIT = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")

_platform = contextvars.ContextVar("attention_platform", default=None)
_reported: set[str] = set()


@contextlib.contextmanager
def compiling_for(platform: str):
    """While active, "auto" chooses for `platform` ("cpu", "gpu"/"cuda", "tpu") instead of the default backend:
    for programs traced here and compiled for another device (deviceless compilation)."""
    token = _platform.set(platform)
    try:
        yield
    finally:
        _platform.reset(token)


def current_platform() -> str:
    """ "cpu", "gpu" or "tpu": the platform attention is traced for."""
    platform = _platform.get() or jax.default_backend()
    return "gpu" if platform in _GPU_PLATFORMS else platform


def resolve(implementation: str, dtype, num_tokens: int, chunk: int = ATTENTION_CHUNK) -> str:
    """The implementation a call with `num_tokens` queries of `dtype` runs: `implementation` unless "auto"."""
    if implementation != "auto":
        return implementation
    platform = current_platform()
    if platform == "gpu" and jnp.dtype(dtype) in _SIXTEEN_BIT:
        return "cudnn"
    if platform == "cpu" and num_tokens <= chunk:
        return "xla"
    return "chunked"


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    implementation: str = "auto",
    chunk: int = ATTENTION_CHUNK,
) -> jax.Array:
    """Softmax attention of q, k, v (B, N, heads, head_dim) -> (B, N, heads, head_dim) by `implementation`."""
    implementation = resolve(implementation, q.dtype, q.shape[1], chunk)
    if implementation == "cudnn" and current_platform() != "gpu":
        _report_once(f"cuDNN attention cannot serve on {current_platform()} (not a GPU); using the chunked attention")
        implementation = "chunked"
    if implementation == "cudnn":
        try:
            return _cudnn_attention(q, k, v, scale)
        except (NotImplementedError, ValueError, RuntimeError) as err:  # what jax raises when cuDNN cannot serve
            _report_once(f"cuDNN attention cannot serve q {q.shape} {q.dtype} ({err}); using the chunked attention")
            implementation = "chunked"
    if implementation == "chunked":
        return chunked_attention(q, k, v, scale=scale, chunk=chunk)
    if implementation == "xla":
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")
    raise ValueError(f"unknown attention implementation {implementation!r}; choose one of {ATTENTION_IMPLEMENTATIONS}")


def _cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """cuDNN's flash attention. Its backward pass takes only even sequence lengths (jax checks it when the
    gradient is traced, too late to fall back): an odd one (257 tokens at 224 px) gets one zero token, which
    the sequence lengths mask out of every softmax, and its output row is dropped."""
    n = q.shape[1]
    if n % 2 == 0:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
    padded = [jnp.pad(a, ((0, 0), (0, 1), (0, 0), (0, 0))) for a in (q, k, v)]
    lengths = jnp.full((q.shape[0],), n, jnp.int32)
    out = jax.nn.dot_product_attention(
        *padded, scale=scale, implementation="cudnn", query_seq_lengths=lengths, key_value_seq_lengths=lengths
    )
    return out[:, :n]


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, chunk: int) -> jax.Array:
    """Exact attention in blocks of at most `chunk` query rows, each recomputed in the backward pass.

    The N queries split into ceil(N / chunk) equal blocks (the last padded with zero queries, whose rows are
    dropped): the scores in flight are one block's (B, heads, block, N), in the forward and the backward pass.
    """
    b, n, heads, head_dim = q.shape
    blocks = -(-n // chunk)

    @jax.checkpoint
    def block(q_block: jax.Array) -> jax.Array:
        return jax.nn.dot_product_attention(q_block, k, v, scale=scale, implementation="xla")

    if blocks == 1:
        return block(q)
    rows = -(-n // blocks)
    padded = jnp.pad(q, ((0, 0), (0, blocks * rows - n), (0, 0), (0, 0)))
    stacked = padded.reshape(b, blocks, rows, heads, head_dim).swapaxes(0, 1)
    out = jax.lax.map(block, stacked)  # (blocks, B, rows, heads, head_dim)
    return out.swapaxes(0, 1).reshape(b, blocks * rows, heads, head_dim)[:, :n]


def _report_once(message: str) -> None:
    if message not in _reported:
        _reported.add(message)
        log.warning(message)
