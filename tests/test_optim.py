"""AdamW groups, schedules, clipping and freezing, checked against torch.optim.AdamW with the same groups."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from reference_models import relative_error

from neco_jax import errors, optim
from neco_jax.settings import OptimSettings

# Relative error (max|a - b| / max|b|, per tensor or schedule) vs torch's AdamW after the run: measured 4.4e-7; the
# schedules vs the original's NumPy formula: 1.2e-7. The bounds are 3x.
ADAMW_TOL, SCHEDULE_TOL = 1.3e-6, 3.6e-7

TOTAL = 6


def _params():
    """A backbone+head tree with the ViT contract's parameter names (2 blocks) and a 3-layer head."""
    rng = np.random.default_rng(0)
    d = 8

    def w(*shape):
        return jnp.asarray(rng.normal(size=shape).astype(np.float32))

    block = lambda: {  # noqa: E731
        "norm1": {"scale": w(d), "bias": w(d)},
        "attn": {"qkv": {"kernel": w(d, 3 * d), "bias": w(3 * d)}, "proj": {"kernel": w(d, d), "bias": w(d)}},
        "ls1": {"gamma": w(d)},
        "mlp": {"fc1": {"kernel": w(d, 2 * d), "bias": w(2 * d)}, "fc2": {"kernel": w(2 * d, d), "bias": w(d)}},
    }
    backbone = {
        "cls_token": w(1, 1, d),
        "pos_embed": w(1, 5, d),
        "mask_token": w(1, d),
        "patch_embed": {"proj": {"kernel": w(2, 2, 3, d), "bias": w(d)}},
        "blocks": {0: block(), 1: block()},
        "norm": {"scale": w(d), "bias": w(d)},
    }
    head = {"layers": {i: {"kernel": w(d, d), "bias": w(d)} for i in range(3)}}
    return {"backbone": backbone, "head": head}


def _cfg(**kw):
    fields = dict(lr_backbone=0.05, lr_heads=0.2, final_lr=0.001, weight_decay=0.04, weight_decay_end=0.5)
    return OptimSettings(**{**fields, "exclude_norm_bias": True, "grad_clip_norm": 0.0, **kw})


def _np_cosine(base, final, total):
    """experiments/utils.py::cosine_scheduler, one value per iteration, in float64."""
    it = np.arange(total)
    return final + 0.5 * (base - final) * (1 + np.cos(np.pi * it / total))


def _flat(tree):
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _torch_run(params, labels, grads_seq, cfg, trained_blocks_clip=None):
    """The original's optimizer: 4 torch AdamW groups, CosineAnnealingLR per step, wd set per step."""
    flat_p, flat_l = _flat(params), _flat(labels)
    tp = {k: torch.nn.Parameter(torch.tensor(np.asarray(v))) for k, v in flat_p.items()}
    groups = []
    for g in optim.GROUPS:
        lr = cfg.lr_backbone if g.startswith("backbone") else cfg.lr_heads
        wd = cfg.weight_decay if g.endswith("_decay") and "no_decay" not in g else 0.0
        groups.append({"params": [tp[k] for k in tp if flat_l[k] == g], "lr": lr, "weight_decay": wd})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=TOTAL, eta_min=cfg.final_lr)
    wd_sched = _np_cosine(cfg.weight_decay, cfg.weight_decay_end, TOTAL)
    for step, grads in enumerate(grads_seq):
        for k, g in _flat(grads).items():
            tp[k].grad = torch.tensor(np.asarray(g)) if flat_l[k] != optim.FROZEN else None
        if cfg.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_([tp[k] for k in tp if flat_l[k] != optim.FROZEN], cfg.grad_clip_norm)
        for i in (0, 2):
            opt.param_groups[i]["weight_decay"] = wd_sched[step]
        opt.step()
        sched.step()
    return {k: v.detach().numpy() for k, v in tp.items()}


def _jax_run(params, labels, grads_seq, cfg):
    tx = optim.make_optimizer(cfg, labels, optim.schedules(cfg, TOTAL))
    state = tx.init(params)
    for grads in grads_seq:
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return _flat(params)


def _grads(params, n, scale=1.0):
    rng = np.random.default_rng(1)
    return [
        jax.tree.map(lambda p: jnp.asarray(scale * rng.normal(size=p.shape).astype(np.float32)), params)
        for _ in range(n)
    ]


def test_groups_hold_exactly_the_right_params():
    labels = _flat(optim.param_labels(_params()))
    expect_no_decay = {k for k in labels if k.endswith("['bias']") or "norm" in k or "['gamma']" in k}
    for k, lab in labels.items():
        part = "head" if k.startswith("['head']") else "backbone"
        if k == "['backbone']['mask_token']":
            assert lab == optim.FROZEN
        elif k in expect_no_decay:
            assert lab == f"{part}_no_decay", k
        else:
            assert lab == f"{part}_decay", k
    # cls_token, pos_embed are >= 2-D, hence decayed, as in the original.
    assert labels["['backbone']['cls_token']"] == "backbone_decay"
    assert labels["['backbone']['pos_embed']"] == "backbone_decay"
    counts = optim.group_counts(optim.param_labels(_params()))
    assert counts == {"backbone_decay": 11, "backbone_no_decay": 17, "head_decay": 3, "head_no_decay": 3, "frozen": 1}


def test_no_exclusion_decays_everything_but_frozen():
    labels = set(jax.tree.leaves(optim.param_labels(_params(), exclude_norm_bias=False)))
    assert labels == {"backbone_decay", "head_decay", optim.FROZEN}


@pytest.mark.parametrize("clip", [0.0, 1.5])
def test_adamw_matches_torch_groups(clip):
    params = _params()
    labels = optim.param_labels(params)
    cfg = _cfg(grad_clip_norm=clip)
    grads_seq = _grads(params, TOTAL, scale=3.0)
    ref = _torch_run(params, labels, grads_seq, cfg)
    got = _jax_run(params, labels, grads_seq, cfg)
    for k in ref:
        assert relative_error(got[k], ref[k]) <= ADAMW_TOL, (k, relative_error(got[k], ref[k]))
    if clip:  # the clip really acted: without it the result differs.
        unclipped = _jax_run(params, labels, grads_seq, _cfg())
        assert max(np.abs(unclipped[k] - got[k]).max() for k in got) > 1e-3


def test_frozen_params_are_untouched():
    params = _params()
    labels = optim.param_labels(params, trainable_blocks=optim.parse_trainable_blocks("-1", 2))
    flat_l = _flat(labels)
    got = _jax_run(params, labels, _grads(params, 3), _cfg())
    before = _flat(params)
    for k, lab in flat_l.items():
        changed = not np.array_equal(got[k], before[k])
        assert changed == (lab != optim.FROZEN), k
        if "['blocks'][1]" in k or k.startswith("['head']"):
            assert lab != optim.FROZEN
        else:  # embeddings, block 0 and the final norm freeze with trainable_blocks, as in the original.
            assert lab == optim.FROZEN


def test_parse_trainable_blocks():
    assert optim.parse_trainable_blocks("", 12) is None
    assert optim.parse_trainable_blocks("-2", 12) == {10, 11}
    assert optim.parse_trainable_blocks("9", 12) == {9, 10, 11}
    assert optim.parse_trainable_blocks("0,3", 12) == {0, 3}
    with pytest.raises(errors.ConfigError, match="blocks 0..11"):
        optim.parse_trainable_blocks("3,12", 12)
    with pytest.raises(errors.ConfigError, match="trainable_blocks"):
        optim.parse_trainable_blocks("last", 12)


def test_schedules_match_the_original():
    n = 1000
    steps = np.arange(n)
    for base, final in ((1e-5, 0.0), (0.04, 0.5)):
        got = np.asarray(jax.vmap(optim.cosine_schedule(base, final, n))(steps))
        assert relative_error(got, _np_cosine(base, final, n)) <= SCHEDULE_TOL
    wd = np.asarray(jax.vmap(optim.cosine_schedule(0.04, 0.5, n))(steps))
    assert wd[0] == pytest.approx(0.04) and np.all(np.diff(wd) > 0) and wd[-1] < 0.5
    h = optim.hyperparams(optim.schedules(_cfg(), n), 0)
    assert float(h["lr_backbone"]) == pytest.approx(0.05) and float(h["lr_heads"]) == pytest.approx(0.2)
    half = optim.hyperparams(optim.schedules(_cfg(), n), n // 2)
    assert math.isclose(float(half["lr_heads"]), 0.5 * (0.2 + 0.001), rel_tol=1e-6)


def test_schedule_as_a_step_argument_gives_the_constants_values():
    """The step takes its schedules as arguments (so that runs share a program); XLA then computes them from
    parameters instead of folded constants: the same float32 values, bit for bit, at every step."""
    steps = np.arange(-1, 1102)
    for base, final, total in ((1e-5, 0.0, 1000), (0.04, 0.5, 1000), (5e-4, 0.0, 7), (0.9995, 1.0, 1)):
        sched = optim.cosine_schedule(base, final, total)
        as_argument = jax.jit(jax.vmap(lambda s, t: s(t), in_axes=(None, 0)))(sched, steps)
        as_constants = jax.jit(jax.vmap(sched))(steps)
        np.testing.assert_array_equal(np.asarray(as_argument), np.asarray(as_constants))


def test_negative_clip_is_an_error():
    with pytest.raises(errors.ConfigError, match="grad_clip_norm"):
        _cfg(grad_clip_norm=-1.0)
