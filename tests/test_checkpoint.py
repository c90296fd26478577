"""Choosing the newest intact checkpoint: damaged ones named with step and file, a misfit one never skipped."""

import re

import pytest

from neco_jax import checkpoint as ckpt_lib
from neco_jax import errors

TS_ERROR = (
    'OUT_OF_RANGE: Error reading "a/.zarray" in OCDBT database at local file "/w/checkpoints/4/state/": '
    'Error reading Byte range [0, 288) of local file "/w/checkpoints/4/state/d/b225ad": Requested byte range '
    '[0, 288) is not valid for value of size 144 [tensorstore_spec=\'{"driver": "zarr"}\']'
)


def _restore(results):
    def restore(step):
        if isinstance(results[step], Exception):
            raise results[step]
        return results[step]

    return restore


def test_falls_back_past_damaged_steps_naming_each():
    seen = []
    step, value = ckpt_lib.newest_intact(
        "/w/checkpoints",
        [2, 3, 4],
        _restore({4: ValueError(TS_ERROR), 3: OSError("bad metadata"), 2: "two"}),
        lambda *a: seen.append(a),
    )
    assert (step, value) == (2, "two")
    assert seen == [
        (4, "/w/checkpoints/4/state/d/b225ad: Requested byte range [0, 288) is not valid for value of size 144", 2),
        (3, "/w/checkpoints/3: bad metadata", 2),
    ]


def test_no_intact_checkpoint_is_one_error_listing_them():
    with pytest.raises(errors.CheckpointError) as info:
        ckpt_lib.newest_intact(
            "/w/checkpoints",
            [3, 4],
            _restore({4: ValueError(TS_ERROR), 3: KeyError("x")}),
            lambda *a: pytest.fail("nothing restored"),
        )
    assert str(info.value) == (
        "no checkpoint in /w/checkpoints can be read: step 4: /w/checkpoints/4/state/d/b225ad: Requested byte "
        "range [0, 288) is not valid for value of size 144; step 3: /w/checkpoints/3: 'x'; move the damaged ones "
        "away (e.g. rm -r /w/checkpoints/<step>) or use a fresh --workdir"
    )


def test_a_checkpoint_that_does_not_fit_the_run_is_not_skipped():
    misfit = errors.CheckpointError("does not match this run's model")
    with pytest.raises(errors.CheckpointError, match="does not match"):
        ckpt_lib.newest_intact(
            "/w/checkpoints", [3, 4], _restore({4: misfit, 3: "three"}), lambda *a: pytest.fail("no fallback")
        )


def _saved(tmp_path, steps):
    import jax.numpy as jnp

    checkpointer = ckpt_lib.Checkpointer(tmp_path / "checkpoints", keep=5)
    for s in steps:
        checkpointer.save(s, {"w": jnp.full((64, 8), float(s)), "step": jnp.int32(s)}, {"next_batch": s})
    checkpointer.close()
    return ckpt_lib.Checkpointer(tmp_path / "checkpoints", keep=5)


def _abstract(shape):
    import jax
    import jax.numpy as jnp

    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return {
        "w": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding),
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding),
    }


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_orbax_checkpoints_damaged_and_misfit(tmp_path, caplog):
    """Real orbax checkpoints: another model's shapes are refused as a misfit (nothing moved); truncated array
    files (step 3) and a broken metadata file (step 2) fall back to step 1, each named by its file and moved
    aside byte for byte."""
    checkpointer = _saved(tmp_path, [1, 2, 3])
    ckpts = tmp_path / "checkpoints"
    with pytest.raises(
        errors.CheckpointError,
        match=r"checkpoints/3 does not match this run's model/optimizer "
        r"\(arrays only in the checkpoint: \{\(\(64, 8\), 'float32'\): 1\}, only in this run: "
        r"\{\(\(64, 9\), 'float32'\): 1\}\)",
    ):
        checkpointer.restore_newest_intact(_abstract((64, 9)))
    assert sorted(p.name for p in ckpts.iterdir()) == ["1", "2", "3"]
    files = [p for p in (ckpts / "3").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for p in files:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    (ckpts / "2" / "state" / "_METADATA").write_text('{"tree_metadata": {')
    before = {s: _files(ckpts / s) for s in ("2", "3")}
    step, state, data = checkpointer.restore_newest_intact(_abstract((64, 8)))
    assert (step, float(state["w"][0, 0]), data) == (1, 1.0, {"next_batch": 1})
    for s, bad_file in (
        ("3", r"checkpoints/3/state/(ocdbt.process_0/)?d/[0-9a-f]+"),
        ("2", r"checkpoints/2/state/_METADATA"),
    ):
        assert re.search(
            rf"checkpoints/{s} is damaged \(.*{bad_file}: .*\); resuming from step 1, the newest "
            rf"intact checkpoint. The damaged one was moved to .*checkpoints.corrupt/{s}; delete it "
            rf"with: rm -r .*checkpoints.corrupt/{s}",
            caplog.text,
        ), s
        assert _files(tmp_path / "checkpoints.corrupt" / s) == before[s]
    assert checkpointer.latest_step() == 1 and sorted(p.name for p in ckpts.iterdir()) == ["1"]
    checkpointer.close()


def test_the_stored_layout_restores_into_the_nnx_train_state(tmp_path):
    """Checkpoints store the train state with each parameter tree as a plain nested dict (integer block keys),
    the optimizer state laid out alike: the layout written before the state held nnx.States. Such a checkpoint,
    built here from plain dicts and saved with orbax directly, restores into today's state value for value."""
    import jax
    import numpy as np
    import optax
    import orbax.checkpoint as ocp
    from flax import nnx
    from train_fixtures import tiny_settings

    from neco_jax import optim, sharding, weights
    from neco_jax import train_state as ts
    from neco_jax.step import build_training

    c = tiny_settings(**{"optim.total_steps": 2})
    student, teacher = weights.random_params(c, 0)
    student = {k: nnx.to_pure_dict(v) for k, v in student.items()}
    teacher = jax.jit(lambda t: jax.tree.map(lambda x: 0.5 * x, t))(
        {k: nnx.to_pure_dict(v) for k, v in teacher.items()}
    )
    assert sorted(student["backbone"]["blocks"]) == [0, 1]
    tx = optim.make_optimizer(c.optim, optim.param_labels(student), optim.schedules(c.optim, 2))
    moved = jax.jit(lambda p: tx.update(jax.tree.map(lambda x: 0.1 * x, p), tx.init(p), p)[1])  # one program
    opt_state = moved(student)  # moments != 0
    stored = ts.create(student, teacher, opt_state, {}, seed=7).replace(step=jax.numpy.int32(5))
    with ocp.CheckpointManager((tmp_path / "checkpoints").resolve(), item_names=("state", "data")) as manager:
        manager.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(stored), data=ocp.args.JsonSave({})))

    abstract = build_training(c, 2, *jax.eval_shape(lambda: weights.random_params(c, 0)))[3]
    abstract = abstract.replace(queue={})  # the stored run had no queue
    replicated = sharding.replicated(sharding.make_mesh(jax.devices()[:1]))
    checkpointer = ckpt_lib.Checkpointer(tmp_path / "checkpoints", keep=1)
    step, state, data = checkpointer.restore_newest_intact(ckpt_lib.abstract_like(abstract, replicated))
    checkpointer.close()
    assert (step, data, int(state.step)) == (5, {}, 5)
    assert isinstance(state.student["backbone"], nnx.State) and isinstance(state.teacher["head"], nnx.State)
    want = dict(jax.tree_util.tree_flatten_with_path(stored)[0])
    got = dict(jax.tree_util.tree_flatten_with_path(ts.to_pure(state))[0])
    assert got.keys() == want.keys() and len(got) > 100
    for path, value in want.items():
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(value), err_msg=jax.tree_util.keystr(path))
    assert float(optax.tree.norm(state.opt_state)) > 0
