"""`config.eval.every_epochs`: an evaluation job on the current teacher from inside training, logged to
metrics.jsonl; off by default, when nothing is built."""

import json

import eval_fixtures
import jax
import pytest
from flax import nnx
from train_fixtures import SAME_STEP_DEMO, tiny_config, tiny_settings

from evaluation import monitor
from neco_jax import errors, weights
from neco_jax import train as train_lib
from neco_jax.metrics_writer import read_metrics
from neco_jax.settings import from_config

EVAL_SET = (
    "image_size=56;mask_size=28;batch_size=4;num_threads=2;num_visualize=0;overcluster.ks=(21,);"
    "overcluster.seeds=(0,);overcluster.iters=3;overcluster.restarts=1;overcluster.pca_dim=8"
)


def test_off_by_default_builds_nothing(tmp_path):
    c = tiny_settings()
    assert c.eval.every_epochs == 0
    assert monitor.make_monitor(c.eval, tmp_path, steps_per_epoch=2) is None
    with pytest.raises(errors.ConfigError, match="every_epochs=-1"):
        tiny_settings(**{"eval.every_epochs": -1})


def test_a_bad_eval_setup_fails_before_training(tmp_path):
    voc = eval_fixtures.make_voc_dataset(tmp_path / "voc", num_train=2, num_val=2)
    fields = {"eval.every_epochs": 1, "eval.data_dir": str(voc), "eval.set": EVAL_SET}
    m = monitor.make_monitor(tiny_settings(**fields).eval, tmp_path / "run", steps_per_epoch=3)
    assert [s for s in range(1, 10) if m.due(s)] == [3, 6, 9]
    m2 = monitor.make_monitor(tiny_settings(**{**fields, "eval.every_epochs": 2}).eval, tmp_path / "run", 3)
    assert [s for s in range(1, 13) if m2.due(s)] == [6, 12]
    with pytest.raises(errors.DatasetError):
        monitor.make_monitor(tiny_settings(**{**fields, "eval.data_dir": str(tmp_path / "none")}).eval, tmp_path, 3)
    with pytest.raises(errors.ConfigError, match="config.eval.set"):
        monitor.make_monitor(tiny_settings(**{**fields, "eval.set": "overcluster.nope=1"}).eval, tmp_path, 3)


@pytest.mark.slow
@SAME_STEP_DEMO
def test_every_epoch_evaluates_the_teacher_into_the_metrics(tmp_path):
    from evaluation import jobs, runner
    from neco_jax import save_backbone

    voc = eval_fixtures.make_voc_dataset(tmp_path / "voc", num_train=2, num_val=4)
    # 4 steps, as the other tiny runs: one compiled step for all of them
    c = tiny_config(**{"optim.total_steps": 4, "eval.every_epochs": 1, "eval.data_dir": str(voc), "eval.set": EVAL_SET})
    with pytest.raises(errors.ConfigError, match="needs an evaluation monitor"):
        train_lib.train_and_evaluate(c, tmp_path / "run")  # the trainer does not import the evaluation package
    out = train_lib.train_and_evaluate(c, tmp_path / "run", make_monitor=monitor.make_monitor)
    rows = [r for r in read_metrics(tmp_path / "run") if "eval_miou" in r]
    assert [(r["step"], r["eval_epoch"]) for r in rows] == [(2, 1), (4, 2)]  # 9 photos, batch 4: 2 steps an epoch
    assert all(0.0 <= r["eval_miou"] <= 1.0 and r["eval_s"] > 0 for r in rows)
    saved = json.loads((tmp_path / "run" / "eval" / "epoch_002" / "results.json").read_text())
    assert saved["miou"] == rows[-1]["eval_miou"]
    assert not (tmp_path / "run" / "eval" / "epoch_002" / "teacher").exists()  # weights not kept twice
    # The number is the final teacher's: the same job on the teacher of the returned state.
    state = jax.device_get(out["state"])
    teacher = nnx.merge(weights.build_models(from_config(c)).teacher_backbone, state.teacher["backbone"])
    save_backbone(teacher, tmp_path / "teacher")
    job = jobs.load_config_file(c.eval.config)
    job.update_from_flattened_dict(
        {
            **jobs.parse_overrides(EVAL_SET.split(";")),
            "data_dir": str(voc),
            "checkpoint": str(tmp_path / "teacher"),
            "workdir": str(tmp_path / "again"),
        }
    )
    assert runner.run_job(job)["miou"] == pytest.approx(rows[-1]["eval_miou"], abs=1e-9)
