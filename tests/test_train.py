"""The train step and loop: exact resume, 1 vs 4 devices, learning on the bundled photos, every recipe's step,
optimizer groups of the real model, weight loading, non-finite handling, and the README's demo command."""

import importlib
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_fixtures import (
    RECIPES,
    SAME_STEP_DEMO,
    SAME_STEP_RECIPES,
    tiny_config,
    tiny_settings,
)

from configs import base
from neco_jax import checkpoint as ckpt_lib
from neco_jax import errors, nonfinite, optim, sharding, weights
from neco_jax import step as step_lib
from neco_jax import train as train_lib
from neco_jax import train_state as ts
from neco_jax.metrics_writer import read_metrics
from neco_jax.models import VisionTransformer, get_arch
from neco_jax.settings import from_config

ROOT = Path(__file__).resolve().parents[1]


def _flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _flat_values(tree):
    return [np.asarray(v, np.float64) for v in _flat(tree).values()]


def _max_diff(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    return max(float(np.max(np.abs(fa[k].astype(np.float64) - fb[k]))) if fa[k].size else 0.0 for k in fa)


# --------------------------------------------------------------------------- groups and weights


def test_random_weights_follow_the_seed_from_one_program_per_model():
    """The same seed gives the same weights, another seed others; runs of the same models in one process share
    one jitted init (traced and loaded once), and other models get their own."""
    settings = tiny_settings()
    built = weights._initializer.cache_info().currsize
    a, b, c = (weights.random_params(settings, seed) for seed in (0, 0, 1))
    assert _max_diff(a, b) == 0 and _max_diff(a, c) > 0
    assert weights._initializer.cache_info().currsize <= built + 1
    assert weights._initializer.cache_info().hits >= 2
    out_dims = {x.shape[-1] for x in jax.tree.leaves(a[0]["head"])}
    other = weights.random_params(tiny_settings(**{"head.out_dim": 32}), 0)[0]["head"]
    assert 32 not in out_dims and 32 in {x.shape[-1] for x in jax.tree.leaves(other)}


def test_optimizer_groups_of_the_real_model():
    student, _ = weights.random_params(tiny_settings(), 0)
    labels = optim.param_labels(student)
    labels = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(ts.to_pure(labels))[0]}
    expected = {}
    for key, value in _flat(ts.to_pure(student)).items():
        head = key.startswith("['head']")
        if key == "['backbone']['mask_token']":
            expected[key] = optim.FROZEN
            continue
        no_decay = key.endswith("['bias']") or value.ndim == 1
        expected[key] = f"{'head' if head else 'backbone'}_{'no_decay' if no_decay else 'decay'}"
    assert labels == expected
    # the original's groups by name: 1-D norms/gammas and biases never decay; embeddings and kernels do
    decayed = {k for k, v in labels.items() if v == "backbone_decay"}
    assert "['backbone']['pos_embed']" in decayed and "['backbone']['cls_token']" in decayed
    assert "['backbone']['blocks'][1]['ls2']['gamma']" in {k for k, v in labels.items() if v == "backbone_no_decay"}
    assert {k for k, v in labels.items() if v.startswith("head")} == {k for k in labels if k.startswith("['head']")}


def test_init_from_saved_folder_drops_registers_and_keeps_values(tmp_path):
    """XR recipe semantics: register weights into a 0-register model; registers dropped, all else loaded."""
    src = VisionTransformer(get_arch("vit_tiny_test", num_register_tokens=4), rngs=nnx.Rngs(3))
    from neco_jax import save_backbone

    save_backbone(src, tmp_path / "w")
    student, teacher, desc = weights.initial_params(tiny_settings(**{"model.init": str(tmp_path / "w")}))
    assert "dropped (not in this model): register_tokens" in desc
    want = ts.split(src)[1]
    want.pop("register_tokens")
    assert _max_diff(student["backbone"], want) == 0.0 and _max_diff(teacher["backbone"], want) == 0.0
    # the heads are two independent random inits, as in the original
    assert _max_diff(student["head"], teacher["head"]) > 1e-3


def test_init_from_a_neco_lightning_checkpoint_restores_student_teacher_and_heads(tmp_path):
    """As the original's only_load_weights: model.* and teacher.* with their projection heads, both restored."""
    import torch

    from neco_jax.convert import export_state_dict, flatten_params, head_to_torch

    c = tiny_config(**{"model.arch": "vit_small_patch14_dinov2", "model.arch_overrides": {"depth": 1}})
    student, _ = weights.random_params(from_config(c), 1)
    _, teacher = weights.random_params(from_config(c), 2)  # a different backbone and head: nothing may be mixed up
    state = {}
    for prefix, params in (("model.", student), ("teacher.", teacher)):
        flat = flatten_params(ts.to_pure(jax.device_get(params["backbone"])))
        state.update({prefix + k: v for k, v in export_state_dict(flat, "dinov2").items()})
        head = head_to_torch(flatten_params(ts.to_pure(jax.device_get(params["head"]))))
        state.update({f"{prefix}projection_head.{k}": v for k, v in head.items()})
    path = tmp_path / "neco.ckpt"
    torch.save({"epoch": 1, "state_dict": {k: torch.from_numpy(np.array(v)) for k, v in state.items()}}, path)
    c = base.set_fields(c, {"model.init": str(path)})
    got_student, got_teacher, desc = weights.initial_params(from_config(c))
    assert _max_diff(got_student, student) == 0.0 and _max_diff(got_teacher, teacher) == 0.0
    assert "student and teacher of a NeCo checkpoint" in desc and desc.count("head loaded") == 2
    # A plain backbone file still goes into both models, heads random (the original's cls_token branch).
    plain = tmp_path / "backbone.pth"
    torch.save(
        {
            k[len("model.") :]: torch.from_numpy(np.array(v))
            for k, v in state.items()
            if k.startswith("model.") and "projection_head" not in k
        },
        plain,
    )
    s2, t2, desc2 = weights.initial_params(from_config(base.set_fields(c, {"model.init": str(plain)})))
    assert _max_diff(s2["backbone"], student["backbone"]) == 0.0 and _max_diff(t2["backbone"], student["backbone"]) == 0
    assert "one backbone into both models" in desc2 and desc2.count("head random") == 2


def test_init_with_nonfinite_weights_is_named(tmp_path):
    from neco_jax import save_backbone

    model = VisionTransformer(get_arch("vit_tiny_test"), rngs=nnx.Rngs(0))
    bias = model.blocks[1].attn.proj.bias
    bias.set_value(bias.get_value().at[3].set(jnp.nan))
    save_backbone(model, tmp_path / "w")
    with pytest.raises(errors.NonFiniteError, match=r"holds NaN or infinite values in \['blocks/1/attn/proj/bias'\]"):
        weights.initial_params(tiny_settings(**{"model.init": str(tmp_path / "w")}))


def test_init_that_does_not_fit_is_named(tmp_path):
    from neco_jax import save_backbone

    save_backbone(VisionTransformer(get_arch("vit_tiny_test"), rngs=nnx.Rngs(0)), tmp_path / "w")
    c = tiny_settings(**{"model.init": str(tmp_path / "w"), "model.num_register_tokens": 4})
    with pytest.raises(errors.ConfigError, match="missing \\['register_tokens'\\]"):
        weights.initial_params(c)


# --------------------------------------------------------------------------- the step on a mesh


def _setup(config, seed=0):
    """(models, labels, schedules, state) for `config` with random weights, on the host, as the trainer builds them."""
    settings = from_config(config)
    student, teacher = weights.random_params(settings, seed)
    return step_lib.build_training(settings, settings.optim.total_steps, student, teacher)


def _batches(config, n):
    from input_pipeline import make_train_loader

    settings = from_config(config)
    loader = make_train_loader(
        settings.views, settings.loader, batch_size=settings.optim.batch_size, seed=settings.run.seed
    )
    out = [step_lib.device_part(next(loader)) for _ in range(n)]
    loader.close()
    return out


def _loop_step(config, devices, seed=0):
    """The trainer's loop step for `config` on a mesh of `devices`, compiled as the trainer compiles it (so the
    compilation cache serves the trainer's runs of the same program, and the other way round): (step, mesh,
    state, schedules), the last two on the mesh; the state's random weights drawn with `seed`."""
    training = _setup(config, seed)
    mesh = sharding.make_mesh(devices)
    repl = sharding.replicated(mesh)
    training = training._replace(state=jax.device_put(training.state, repl))
    step = step_lib.compile_loop_step(from_config(config), training, mesh, None)[0].compiled
    return step, mesh, training.state, jax.device_put(training.schedules, repl)


def _empty_sums(config, mesh):
    """The loop's fresh metric sums for `config` (its non-finite cap), placed as the trainer places them."""
    return step_lib.empty_sums(nonfinite.cap(from_config(config).optim), 0, sharding.replicated(mesh))


def _run_steps(config, devices, batches):
    step, mesh, state, sched = _loop_step(config, devices)
    sums = _empty_sums(config, mesh)
    losses = []
    for b in batches:
        state, metrics, sums = step(state, sharding.global_batch(b, mesh), sums, sched)
        losses.append(float(metrics["loss"]))
    return jax.device_get(state), losses


@pytest.mark.slow
@SAME_STEP_DEMO
def test_one_device_and_four_devices_agree():
    """The same global batch on a mesh of 1 and of 4 CPU devices: same losses and parameters after 2 steps of the
    trainer's loop step (on 4 devices, the demo's program)."""
    assert len(jax.devices()) >= 4, "conftest provides 4 CPU devices"
    c = tiny_config(**{"optim.lr_backbone": 1e-5, "optim.lr_heads": 1e-4})  # at most 2 steps x 2 lr apart
    batches = _batches(c, 2)
    s1, l1 = _run_steps(c, jax.devices()[:1], batches)
    s4, l4 = _run_steps(c, jax.devices()[:4], batches)
    np.testing.assert_allclose(l4, l1, rtol=1e-5)
    # Adam's first step moves every weight by ~lr whatever its gradient: an entry whose gradient is float32
    # reduction-order noise (~1e-8) moves by +-lr on either mesh. Such entries are rare (1 of 172k measured); all
    # others agree to 2e-7.
    student = np.concatenate([np.abs(x - y).ravel() for x, y in zip(*map(_flat_values, (s4.student, s1.student)))])
    noise_moved = int(np.sum(student > 1e-6))
    err = max(float(np.max(student[student <= 1e-6])), _max_diff(s4.teacher, s1.teacher), _max_diff(s4.queue, s1.queue))
    print(f"1 vs 4 devices: losses {l1} vs {l4}, max |param diff| {err:.3g} (+{noise_moved} entries moved by noise)")
    assert err <= 1e-6 and noise_moved <= 1e-4 * student.size and student.max() <= 2 * 2 * 1e-4
    assert _max_diff(s1.student, _setup(c)[3].student) > 1e-5  # the two steps did change the parameters
    # Adam's first moments are linear in the gradients: they agree to float32 reduction noise.
    m1, m4 = _flat(s1.opt_state), _flat(s4.opt_state)
    for k in m1:
        assert np.abs(m1[k] - m4[k]).max() <= 1e-4 * (np.abs(m1[k]).max() + 1e-30), k


def test_runs_differing_in_schedules_or_length_share_one_program():
    """Learning rates, weight decay, EMA momentum, run length and the non-finite steps that stop a run reach the
    step as arguments: the demo and every tiny run lower to one program (one compilation through the cache), and a
    schedule is all that differs."""

    def lowered(**fields):
        settings = tiny_settings(**fields)
        student, teacher = jax.eval_shape(lambda: weights.random_params(settings, 0))
        training = step_lib.build_training(settings, settings.optim.total_steps, student, teacher)
        return step_lib.lower_loop_step(settings, training, sharding.make_mesh())[0].as_text(), training.schedules

    demo, demo_sched = lowered()
    other, other_sched = lowered(
        **{
            **SKIP_RUN,
            "optim.total_steps": 7,
            "optim.lr_backbone": 3e-3,
            "optim.weight_decay_end": 0.1,
            "ema.momentum": 0.99,
        }
    )
    assert demo == other
    assert float(other_sched["lr_backbone"](0)) == pytest.approx(3e-3, rel=1e-6)
    assert float(demo_sched["lr_backbone"](0)) == pytest.approx(5e-4, rel=1e-6)
    assert float(other_sched["ema_rate"](0)) == pytest.approx(0.01, rel=1e-6) and other_sched["ema_rate"].total == 7


@pytest.mark.slow
@SAME_STEP_DEMO
def test_a_run_in_the_same_process_reuses_the_last_runs_executable():
    """Runs of one program in one process (schedules apart) get the executable compiled for the first, not
    another load from the compilation cache; a program on other devices, or another program, gets its own."""
    first = _loop_step(tiny_config(), jax.devices())[0]
    assert _loop_step(tiny_config(**{"optim.lr_backbone": 3e-3}), jax.devices())[0] is first

    def lowered(devices, factor):
        mesh = sharding.make_mesh(devices)
        return jax.jit(lambda x: x * factor, out_shardings=sharding.replicated(mesh)).lower(jnp.ones(4)), mesh

    small = step_lib._compile_reusing(*lowered(jax.devices()[:1], 2))
    assert step_lib._compile_reusing(*lowered(jax.devices()[:1], 2)) is small
    assert step_lib._compile_reusing(*lowered(jax.devices()[1:2], 2)) is not small
    assert step_lib._compile_reusing(*lowered(jax.devices()[:1], 3)) is not small
    for factor in range(4, 4 + step_lib._KEEP):  # the oldest are let go
        step_lib._compile_reusing(*lowered(jax.devices()[:1], factor))
    assert step_lib._compile_reusing(*lowered(jax.devices()[:1], 2)) is not small


def _with_nan_boxes(batch):
    """The batch with NaN overlap boxes: a non-finite loss from the same compiled program (same input types)."""
    return {**batch, "boxes_gc": np.full_like(batch["boxes_gc"], np.nan)}


def _nan_learning_rates(sched):
    """The schedules with NaN learning rates: a finite loss whose update is non-finite, from the step's own
    program (schedules are arguments of the step)."""
    nan = np.float32(np.nan)
    return {k: v._replace(base=nan, final=nan, rise=nan) if k.startswith("lr_") else v for k, v in sched.items()}


SKIP_RUN = {"optim.total_steps": 4, "optim.on_nonfinite": "skip", "optim.max_consecutive_skips": 2}


@pytest.mark.slow
@SAME_STEP_DEMO
def test_nonfinite_step_changes_nothing_but_the_counters():
    """A non-finite loss (NaN overlap boxes), and a finite loss whose update is non-finite (NaN learning rate):
    the step commits neither; the second is seen only by checking the new state itself. The step is the demo's
    program (the skip mode and its cap are values the step carries)."""
    c = tiny_config(**SKIP_RUN)
    step, mesh, state, sched = _loop_step(c, jax.devices())
    repl = sharding.replicated(mesh)
    state, sched = jax.device_get(state), jax.device_put(_nan_learning_rates(jax.device_get(sched)), repl)
    batch = _batches(c, 1)[0]
    bad = _with_nan_boxes(batch)
    for n, b in enumerate((bad, batch), start=1):
        new, metrics, _ = step(jax.device_put(state, repl), sharding.global_batch(b, mesh), _empty_sums(c, mesh), sched)
        assert not bool(metrics["finite"]) and int(new.skipped) == 1 and int(new.step) == 1
        assert np.isfinite(metrics["loss"]) == (b is batch)
        for part in ("student", "teacher", "opt_state", "queue"):
            assert _max_diff(jax.device_get(getattr(new, part)), getattr(state, part)) == 0.0, (n, part)
        assert not np.array_equal(new.rng, state.rng)


# --------------------------------------------------------------------------- the loop


def _losses(workdir):
    return {r["step"]: r["loss_last"] for r in read_metrics(workdir)}


def _photo_folder(root):
    """The 9 sample photos and 3 unreadable files: 12 files, every one read in each 3-step epoch of batch 4."""
    import shutil

    from input_pipeline.sample_data import sample_image_paths

    root.mkdir()
    for i, path in enumerate(sample_image_paths()):
        shutil.copy(path, root / f"{i}{Path(path).suffix}")
    for i in range(3):
        (root / f"broken{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return str(root)


def _truncate_arrays(step_dir):
    """Cut every array file of a checkpoint to half its size, as a full disk or a bad copy leaves it."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    for p in files:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return files


@pytest.mark.slow
@SAME_STEP_DEMO
def test_exact_resume(tmp_path, caplog):
    """4 steps straight vs 3 steps whose last checkpoint is then damaged (truncated array files), resumed from
    step 2, the newest intact one: same params, teacher, queue, optimizer, RNG and data order; the damaged
    checkpoint is named and moved aside, not lost; evaluation falls back the same way; metrics.jsonl holds
    each step once (the replayed step's first row set aside) and the skipped-image count continues. A rerun
    with a config that changes the computation is refused and leaves the record as it was."""
    from evaluation.features import load_from_workdir

    c = tiny_config(
        **{
            "optim.total_steps": 4,
            "checkpoint_every_steps": 2,
            "data.dataset_name": "folder",
            "data.data_dir": _photo_folder(tmp_path / "photos"),
            "data.max_bad_fraction": 0.5,
        }
    )
    straight = train_lib.train_and_evaluate(c, tmp_path / "a")["state"]
    first = train_lib.train_and_evaluate(c, tmp_path / "b", stop_after=3)
    assert first["step"] == 3 and first["stopped_by_signal"] is None
    ckpts = tmp_path / "b" / "checkpoints"
    damaged = _truncate_arrays(ckpts / "3")
    damaged_bytes = {p.relative_to(ckpts / "3"): p.read_bytes() for p in (ckpts / "3").rglob("*") if p.is_file()}
    bad_file = r"b/checkpoints/3/state/(ocdbt.process_0/)?d/[0-9a-f]+: Requested byte range"

    teacher = ts.split(load_from_workdir(tmp_path / "b", "teacher"))[1]
    assert re.search(
        r"checkpoint .*/b/checkpoints/3 is damaged \(.*" + bad_file + r".*\); using step 2, the newest "
        r"intact checkpoint. Remove the damaged one with: rm -r .*/b/checkpoints/3",
        caplog.text,
    )
    step2 = ts.from_pure(teacher, _restored_state(tmp_path / "b", 2)["teacher"]["backbone"])
    assert _max_diff(teacher, step2) == 0.0
    assert (ckpts / "3").is_dir()  # evaluation only reads
    caplog.clear()

    resumed = train_lib.train_and_evaluate(c, tmp_path / "b")["state"]
    aside = tmp_path / "b" / "checkpoints.corrupt" / "3"
    assert re.search(
        r"checkpoint .*/b/checkpoints/3 is damaged \(.*" + bad_file + r".*\); resuming from step 2, "
        r"the newest intact checkpoint. The damaged one was moved to .*/b/checkpoints.corrupt/3; delete "
        r"it with: rm -r .*/b/checkpoints.corrupt/3",
        caplog.text,
    )
    assert {p.relative_to(aside): p.read_bytes() for p in aside.rglob("*") if p.is_file()} == damaged_bytes
    assert damaged and sorted(p.name for p in ckpts.iterdir()) == ["2", "4"]
    err = max(
        _max_diff(jax.device_get(getattr(straight, p)), jax.device_get(getattr(resumed, p)))
        for p in ("student", "teacher", "opt_state", "queue", "rng", "step")
    )
    print(f"resume: max |diff| over params/teacher/optimizer/queue/rng = {err:.3g}")
    assert err <= 1e-6
    rows_a, rows_b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == [1, 2, 3, 4]
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    for s in (3, 4):  # the resumed steps saw the same batches and references
        assert abs(a[s] - b[s]) <= 1e-6 * abs(a[s]), s
    skipped = [r["skipped_images"] for r in rows_a]
    assert [r["skipped_images"] for r in rows_b] == skipped and skipped[-1] > skipped[1] > 0, skipped
    replaced = [json.loads(line) for line in (tmp_path / "b" / "metrics.replaced.jsonl").read_text().splitlines()]
    assert [(r["step"], r["replaced_on_resume_from_step"]) for r in replaced] == [(3, 2)]
    starts = [json.loads(line) for line in (tmp_path / "b" / "starts.jsonl").read_text().splitlines()]
    assert [(s["step"], s["previous_config"]) for s in starts] == [(0, None), (2, None)]

    record = {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir() if p.is_file()}
    checkpoints = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    changed = base.set_fields(
        tiny_config(
            **{
                "optim.total_steps": 4,
                "checkpoint_every_steps": 2,
                "data.dataset_name": "folder",
                "data.data_dir": c.data.data_dir,
                "data.max_bad_fraction": 0.5,
            }
        ),
        {"optim.lr_backbone": 1e-3, "loss.sort_net": "odd_even", "log_every_steps": 2},
    )
    with pytest.raises(
        errors.ConfigChangedError,
        match=r"differs from this config in fields that change the "
        r"computation: loss.sort_net: 'bitonic' -> 'odd_even'; optim.lr_backbone: 0.0005 -> 0.001\. "
        r"Resume with the stored config.*--allow_config_change",
    ):
        train_lib.train_and_evaluate(changed, tmp_path / "b")
    assert {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir() if p.is_file()} == record
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == checkpoints


RECIPE_RUNS = [(n, "") for n in RECIPES if n != "demo"]
# Ablations with a code path of their own in the step (attention masks; the student as its own teacher).
# The sorter-only ablations (odd_even, steepness pairs) change arguments that test_sorting covers.
RECIPE_RUNS += [("dinov2r_xr_s14", a) for a in ("fg", "no_teacher")]


@pytest.mark.slow
@pytest.mark.parametrize("name,arg", RECIPE_RUNS)
@SAME_STEP_RECIPES
def test_every_recipe_runs_one_step(name, arg, tmp_path):
    """Each recipe with random weights at reduced shapes: 1 block, dim 32, small crops, batch 4, one step."""
    c = importlib.import_module(f"configs.{name}").get_config(arg)
    patch = get_arch(c.model.arch).patch_size
    with c.unlocked():
        c.model.arch_overrides = {"depth": 1, "embed_dim": 32, "num_heads": 2}
    base.set_fields(
        c,
        {
            "model.init": "random",
            "head.hidden_dim": 32,
            "head.out_dim": 16,
            "data.dataset_name": "sample",
            "data.size_crops": (4 * patch, 2 * patch),
            "data.num_workers": 0,
            "optim.batch_size": 4,
            "optim.total_steps": 1,
            "loss.queue_length": 256,
            "export_at_end": False,
        },
    )
    out = train_lib.train_and_evaluate(c, tmp_path)
    assert out["step"] == 1 and np.isfinite(out["loss"])
    state = jax.device_get(out["state"])
    assert ("register_tokens" in state.student["backbone"]) == (c.model.num_register_tokens > 0)
    assert (tmp_path / "checkpoints" / "1").is_dir()


class _NaNBoxesFrom:
    """The training loader with NaN overlap boxes from its `first`-th batch on: a non-finite loss from the very
    demo's program, as the other tiny runs (one compilation for all of them)."""

    def __init__(self, loader, first: int):
        self.loader, self.first, self.read = loader, first, 0

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def fetch(self):  # what the trainer's prefetch reads batches with
        batch, self.read = self.loader.fetch(), self.read + 1
        return _with_nan_boxes(batch) if self.read >= self.first else batch


@pytest.mark.slow
@SAME_STEP_DEMO
def test_nonfinite_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    real = train_lib.make_train_loader
    monkeypatch.setattr(train_lib, "make_train_loader", lambda *a, **k: _NaNBoxesFrom(real(*a, **k), first=3))
    c = tiny_config(**{"optim.total_steps": 4, "checkpoint_every_steps": 1})
    with pytest.raises(errors.NonFiniteError, match=r"^step 3: the loss \(nan\)") as info:
        train_lib.train_and_evaluate(c, tmp_path)
    bad = int(info.value.args[0].split(":")[0].split()[1])
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [1, 2] and saved[-1] == bad - 1


def _restored_state(workdir, step):
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager((workdir / "checkpoints").resolve(), item_names=("state", "data"))
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    manager.close()
    return state


@pytest.mark.slow
@SAME_STEP_DEMO
def test_skip_stops_after_the_cap_and_saves_only_finite_state(tmp_path, monkeypatch):
    """on_nonfinite=skip with every update non-finite (finite loss, NaN learning rates): skipped steps are
    counted, the cap stops the run naming it, and neither the checkpoints nor an export ever hold a non-finite
    value."""
    real = train_lib.build_training  # the initial state as always; the step's schedule arguments NaN

    def nan_schedules(*args):
        training = real(*args)
        return training._replace(schedules=_nan_learning_rates(training.schedules))

    monkeypatch.setattr(train_lib, "build_training", nan_schedules)
    c = tiny_config(**SKIP_RUN, **{"checkpoint_every_steps": 1, "export_at_end": True})
    with pytest.raises(
        errors.NonFiniteError,
        match=r"^step 2: 2 non-finite steps in a row, the update \(loss "
        r"[0-9.]+, gradient norm [0-9.]+\) made the weights, teacher, optimizer state or queue "
        r"non-finite; the update was not applied",
    ) as info:
        train_lib.train_and_evaluate(c, tmp_path)
    assert "optim.max_consecutive_skips=2" in str(info.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]
    leaves = [np.asarray(a) for a in jax.tree.leaves(_restored_state(tmp_path, 1))]
    assert all(np.all(np.isfinite(a)) for a in leaves if a.dtype.kind == "f")
    assert not (tmp_path / "export").exists()
    assert [r["nonfinite_steps"] for r in read_metrics(tmp_path)] == [1]


def _demo_command(workdir):
    return [sys.executable, "main.py", "--config=configs/demo.py", f"--workdir={workdir}"]


def _signal_demo_after_first_row(workdir, signum):
    """Run the README's demo command, send `signum` once its first metrics row is written (the loop is then
    running), and check it stopped as main.py documents: exit status 128 + signum ("stopped, resumable", not
    "finished"), a checkpoint before the last step, the signal named, no export. Returns stderr."""
    proc = subprocess.Popen(_demo_command(workdir), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (workdir / "metrics.jsonl").is_file() and read_metrics(workdir):
            proc.send_signal(signum)
            break
        time.sleep(0.05)  # the demo's 40 steps take a few seconds
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + signum, err[-3000:]
    stopped = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert stopped and stopped[-1] < 40 and f"signal {int(signum)}" in err, err[-2000:]
    assert not (workdir / "export").exists()
    return err


@pytest.mark.slow
@SAME_STEP_DEMO
def test_demo_command_end_to_end_with_sigterm_and_resume(tmp_path):
    """The README's main command as a user runs it: SIGTERM mid-run saves and exits cleanly; the same
    command then resumes from that checkpoint and finishes, writing metrics, checkpoints and exports; and the
    trained weights order patches better than the initial ones (it learns)."""
    workdir = tmp_path / "demo"
    _signal_demo_after_first_row(workdir, signal.SIGTERM)  # exit status 143

    done = subprocess.run(_demo_command(workdir), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr
    rows = read_metrics(workdir)
    assert rows[-1]["step"] == 40 and all(np.isfinite(r["loss"]) for r in rows)
    assert {
        "images_per_s",
        "data_wait_s",
        "compute_s",
        "lr_backbone",
        "lr_heads",
        "weight_decay",
        "momentum",
        "grad_norm",
        "skipped_images",
        "eta_s",
    } <= rows[-1].keys()
    assert max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == 40
    import torch

    for part in ("student", "teacher"):
        sd = torch.load(workdir / "export" / f"{part}_dinov2.pth")
        assert sd["pos_embed"].shape == (1, 17, 64) and "blocks.1.mlp.fc2.weight" in sd
        assert (workdir / "export" / part / "config.json").is_file()
    assert json.loads((workdir / "config.json").read_text())["model"]["arch"] == "vit_tiny_test"
    assert "ETA" in done.stderr
    assert (workdir / "metrics.png").is_file()  # the run's curves (tests/test_plot.py checks what they show)
    _assert_it_learned(workdir)


@SAME_STEP_DEMO
def test_demo_command_stops_on_ctrl_c_with_status_130(tmp_path):
    """Ctrl-C (SIGINT) stops the demo command as SIGTERM does: a checkpoint at the step boundary and exit
    status 130 (README, "What happens when things go wrong"); the checkpoint resumes (the test above)."""
    _signal_demo_after_first_row(tmp_path / "demo", signal.SIGINT)


def _assert_it_learned(workdir):
    """The demo's 40 steps lower the NeCo loss on a fixed batch (same references, drop-path draws and colour
    augmentation) by a clear margin against its own initial weights. The loss is the one the demo's own step
    reports (it computes it before updating), so no other program is compiled."""
    c = importlib.import_module("configs.demo").get_config()
    step, mesh, state0, sched = _loop_step(c, jax.devices(), seed=c.seed)  # the trainer's random init
    repl = sharding.replicated(mesh)
    start = jax.device_get(state0)
    parts = {"student": start.student, "teacher": start.teacher}
    saved = jax.device_get(ckpt_lib.restore_part(workdir / "checkpoints", 40, ckpt_lib.abstract_like(parts, repl)))
    batch = sharding.global_batch(_batches(c, 1)[0], mesh)

    def loss(weights):  # the initial queue, RNG and step around either weights (the step donates its state)
        state = jax.device_put(start.replace(**weights), repl)
        return float(step(state, batch, _empty_sums(c, mesh), sched)[1]["loss"])

    before, after = loss(parts), loss(saved)
    print(f"loss on a fixed batch: step 0 {before:.4f} -> step 40 {after:.4f}")
    assert after < before - 0.05 * abs(before)
