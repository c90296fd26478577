"""A workdir written by the code before the settings dataclasses (commit 2551622, the parent of f8c4286) resumes
with today's code: tests/data/pre_settings_checkpoint (how it was made: tests/data/make_pre_settings_checkpoint.py)
holds the old trainer's checkpoint at step 2 of a 4-step tiny run and its record, and the metrics that the
old code computed for steps 3 and 4 after it."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from train_fixtures import SAME_STEP_DEMO, tiny_config

from neco_jax import checkpoint as ckpt_lib
from neco_jax import train as train_lib
from neco_jax import train_state as ts
from neco_jax.metrics_writer import read_metrics

FIXTURE = Path(__file__).resolve().parent / "data" / "pre_settings_checkpoint"
# The old run's config (tests/train_fixtures.py's tiny_config with these fields at both commits; the old run was
# given today's demo ROI-align grid, 4x4, so that this test's program is the demo's).
FIELDS = {"optim.total_steps": 4, "checkpoint_every_steps": 2}
# Computed by the train step: within rounding of the old program's (5.5e-7 relative at most where measured; the
# old values come from one CPU, whose instruction set may round differently than another's). A step on the wrong
# batch or state is off by more than 1e-2. The schedules' values and the counters: equal.
RTOL = 1e-5
COMPUTED = ("loss", "loss_last", "grad_norm", "grad_norm_mean", "pair_losses")
COUNTED = ("queue_filled", "zero_reference_fraction", "nonfinite_steps", "skipped_images")
SCHEDULED = ("lr_backbone", "lr_heads", "weight_decay", "momentum")


def _flat(tree):
    return {
        jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(v)
        for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _stored_arrays(workdir, step):
    """Checkpoint `step`'s arrays as orbax reads them with no target: the files as the old code wrote them."""
    with ocp.PyTreeCheckpointer() as reader:
        return _flat(reader.restore((workdir / "checkpoints" / str(step) / "state").resolve()))


@SAME_STEP_DEMO
def test_a_checkpoint_written_before_the_settings_resumes_and_continues_as_the_old_code(tmp_path, monkeypatch, caplog):
    """Today's trainer, given the command that wrote the workdir, resumes from the old checkpoint at step 2 (the
    record's config accepted, every array restored bit for bit, the loader at its stored position), and steps
    3 and 4 compute what the old code computed: the same losses, gradients and queue fill, so the same
    batches, references and state. The record keeps the old rows and config."""
    workdir = tmp_path / "run"
    shutil.copytree(FIXTURE / "workdir", workdir)
    old_record = {p.name: p.read_text() for p in workdir.iterdir() if p.is_file()}
    stored = _stored_arrays(workdir, 2)

    restored = {}
    restore = ckpt_lib.Checkpointer.restore_newest_intact

    def keep_a_copy(self, abstract_state):  # what the trainer restores, copied before the first step
        step, state, data = restore(self, abstract_state)
        restored.update(step=step, state=_flat(jax.device_get(ts.to_pure(state))), data=data)
        return step, state, data

    monkeypatch.setattr(ckpt_lib.Checkpointer, "restore_newest_intact", keep_a_copy)
    caplog.set_level("INFO", logger="neco_jax.train")
    # On the CPU, where the old values were computed (the tests' 4 simulated devices; the old run had 1).
    result = train_lib.train_and_evaluate(tiny_config(**FIELDS), workdir, devices=jax.devices("cpu"))

    assert f"init: resumed from {workdir}/checkpoints/2" in caplog.text
    assert restored["step"] == 2 and result["step"] == 4 and result["stopped_by_signal"] is None
    assert restored["state"].keys() == stored.keys()
    for name, value in stored.items():
        got = restored["state"][name]
        assert got.dtype == value.dtype and got.shape == value.shape and np.array_equal(got, value), name
    assert restored["data"] == json.loads((FIXTURE / "workdir/checkpoints/2/data/metadata").read_text())

    old = {r["step"]: r for r in map(json.loads, (FIXTURE / "old_code_metrics.jsonl").read_text().splitlines())}
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[:2] == [json.loads(line) for line in old_record["metrics.jsonl"].splitlines()]
    for row in rows[2:]:
        was = old[row["step"]]
        for key in COMPUTED:
            np.testing.assert_allclose(row[key], was[key], rtol=RTOL, err_msg=f"step {row['step']} {key}")
        assert {k: row[k] for k in COUNTED + SCHEDULED} == {k: was[k] for k in COUNTED + SCHEDULED}
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]

    # The old config is kept (it differs from today's in fields that do not compute), and the start is recorded.
    assert (workdir / "config.1.json").read_text() == old_record["config.json"]
    starts = [json.loads(line) for line in (workdir / "starts.jsonl").read_text().splitlines()]
    assert [(s["step"], s["previous_config"]) for s in starts] == [(0, None), (2, "config.1.json")]
