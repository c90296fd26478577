"""The original's AdamW: four parameter groups, cosine learning rates, cosine-rising weight decay.

NeCo (`src/neco.py::configure_optimizers`) splits the student into backbone and projection head, and each
into a decayed group and a no-decay group (names ending in `bias` and every 1-D parameter: norms and
LayerScale gammas). Backbone groups use `lr_backbone`, head groups `lr_heads`; both decay along a cosine to
`final_lr` without warmup, and the decayed groups' weight decay rises along a cosine from `weight_decay`
to `weight_decay_end`. PyTorch's AdamW decay is decoupled and multiplied by the learning rate, which is
what `optax.adamw` does. Parameters that never receive a gradient in the original (`mask_token`, and
everything outside `trainable_blocks` when it is set) are frozen here: PyTorch skips a parameter whose
grad is None, so decaying them would shrink weights the original leaves alone.
"""

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from neco_jax.errors import ConfigError
from neco_jax.settings import OptimSettings

GROUPS = ("backbone_decay", "backbone_no_decay", "head_decay", "head_no_decay")
FROZEN = "frozen"
# Backbone parameters that no forward pass of training reads, hence never get a gradient.
NEVER_TRAINED = ("mask_token",)


class Cosine(NamedTuple):
    """`final + 0.5 (base - final)(1 + cos(pi t / total))`: the original's per-iteration cosine, called on the step.

    Used for the learning rates (CosineAnnealingLR with eta_min=final) and the weight decay
    (`experiments/utils.py::cosine_scheduler`); t counts from 0 and the schedule is held at `final`
    past `total`. Evaluated as `base + (final - base) sin^2(x)` in the first half and
    `final + (base - final) cos^2(x)` in the second (x = pi t / 2 total): the same value, without the
    float32 cancellation that `1 + cos` suffers near either end. (`optax.cosine_decay_schedule` computes
    `1 + cos` and scales by `final / base`: up to 0.25 % off the original's learning rate near the end of a
    run, and 0 for the EMA rate `1 - m` of the last step, which is 6e-13 in the original; tests/test_optim.py and
    test_ema.py hold this one to 1e-6.)

    The fields are float32 scalars worked out in double precision (`cosine_schedule`), and the tuple is a pytree:
    the train step takes its schedules as arguments, so runs that differ only in learning rates, weight decay,
    momentum or length share one compiled program.
    """

    base: Any
    final: Any
    rise: Any  # final - base
    scale: Any  # pi / (2 total)
    total: Any

    def __call__(self, step) -> jax.Array:
        t = jnp.minimum(jnp.asarray(step, jnp.float32), self.total)
        x = self.scale * t
        return jnp.where(
            2 * t < self.total,
            self.base + self.rise * jnp.square(jnp.sin(x)),
            self.final - self.rise * jnp.square(jnp.cos(x)),
        )


def cosine_schedule(base: float, final: float, total_steps: int) -> Cosine:
    """The cosine from `base` to `final` over `total_steps` (at least 1)."""
    base, final, total = float(base), float(final), max(int(total_steps), 1)
    values = (base, final, final - base, 0.5 * math.pi / total, total)
    return Cosine(*(np.float32(v) for v in values))


def parse_trainable_blocks(spec: str | int | None, depth: int) -> set[int] | None:
    """Which blocks train: None = all params; "-n" = last n blocks; "n" = blocks n onwards; "i,j" = those.

    The integer forms follow the original's `sorted_block_ids[trainable_blocks:]` slicing.
    """
    if spec is None or spec == "":
        return None
    text = str(spec).strip()
    if "," in text or text.startswith("["):
        try:
            ids = {int(x) for x in text.strip("[]").split(",") if x.strip()}
        except ValueError:
            raise ConfigError(
                f'optim.trainable_blocks={spec!r} is not a list of block numbers; write e.g. "10,11"'
            ) from None
        bad = sorted(i for i in ids if not 0 <= i < depth)
        if bad:
            raise ConfigError(f"optim.trainable_blocks names blocks {bad}, but the backbone has blocks 0..{depth - 1}")
        return ids
    try:
        n = int(text)
    except ValueError:
        raise ConfigError(f"optim.trainable_blocks={spec!r} is not an int or a list of block numbers") from None
    return set(range(depth)[n:])


def _name(key) -> str:
    return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))


def param_labels(
    params: Mapping[str, Any], *, exclude_norm_bias: bool = True, trainable_blocks: set[int] | None = None
) -> Any:
    """A pytree like `params` ({"backbone": ..., "head": ...}) with each leaf's group name (or "frozen")."""

    def label(path, leaf) -> str:
        names = [_name(k) for k in path if not isinstance(k, jax.tree_util.GetAttrKey)]  # not an nnx.Param's .value
        part = names[0]
        if part not in ("backbone", "head"):
            raise ValueError(f"parameter {'/'.join(names)} is neither under 'backbone' nor 'head'")
        if part == "backbone":
            if names[1] in NEVER_TRAINED:
                return FROZEN
            if trainable_blocks is not None:
                block = int(names[2]) if names[1] == "blocks" else None
                if block not in trainable_blocks:
                    return FROZEN
        no_decay = exclude_norm_bias and (names[-1] == "bias" or jnp.ndim(leaf) == 1)
        return f"{part}_{'no_decay' if no_decay else 'decay'}"

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(settings: OptimSettings, labels: Any, sched: Mapping[str, Cosine]) -> optax.GradientTransformation:
    """AdamW over the four groups (torch defaults: betas 0.9/0.999, eps 1e-8), frozen params untouched, following
    the schedules `sched` (`schedules`: concrete, or the train step's arguments).

    With `grad_clip_norm > 0` the gradients of the trained params are clipped to that global norm before
    Adam sees them (unlike the original, whose clipping runs before the backward pass and never acts).
    """
    lr_backbone, lr_heads, wd = sched["lr_backbone"], sched["lr_heads"], sched["weight_decay"]
    adamw = optax.inject_hyperparams(optax.adamw)

    def group(lr, decay):
        return adamw(learning_rate=lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=decay)

    tx = optax.multi_transform(
        {
            "backbone_decay": group(lr_backbone, wd),
            "backbone_no_decay": group(lr_backbone, 0.0),
            "head_decay": group(lr_heads, wd),
            "head_no_decay": group(lr_heads, 0.0),
            FROZEN: optax.set_to_zero(),
        },
        labels,
    )
    if settings.grad_clip_norm > 0:
        trained = jax.tree.map(lambda lab: lab != FROZEN, labels)
        tx = optax.chain(optax.masked(optax.clip_by_global_norm(settings.grad_clip_norm), trained), tx)
    return tx


def trained_grad_norm(grads: Any, labels: Any) -> jax.Array:
    """Global L2 norm of the gradients of the trained (non-frozen) params, as the clipping sees it."""
    leaves = [g for g, lab in zip(jax.tree.leaves(grads), jax.tree.leaves(labels)) if lab != FROZEN]
    return optax.tree.norm(leaves)


def schedules(settings: OptimSettings, total_steps: int) -> dict[str, Cosine]:
    """The learning rates and the decayed groups' weight decay, each a function of the step."""
    return {
        "lr_backbone": cosine_schedule(settings.lr_backbone, settings.final_lr, total_steps),
        "lr_heads": cosine_schedule(settings.lr_heads, settings.final_lr, total_steps),
        "weight_decay": cosine_schedule(settings.weight_decay, settings.weight_decay_end, total_steps),
    }


def hyperparams(sched: Mapping[str, Cosine], step) -> dict[str, jax.Array]:
    """The learning rates and weight decay the optimizer applies at `step` (for the metrics)."""
    return {name: sched[name](step) for name in ("lr_backbone", "lr_heads", "weight_decay")}


def group_counts(labels: Any) -> dict[str, int]:
    """Number of parameter tensors per group, for the start-of-run log."""
    counts = {g: 0 for g in (*GROUPS, FROZEN)}
    for lab in jax.tree.leaves(labels):
        counts[lab] += 1
    return counts
