"""A run that stops before its first step (a data error, a SIGTERM during setup) leaves no empty checkpoints/ or
tensorboard/ folder behind, and a signal then says in one line that nothing was saved. Both stop before any
step is compiled."""

from __future__ import annotations

import os
import signal

import pytest
from train_fixtures import tiny_config

from neco_jax import errors
from neco_jax import train as train_lib


def test_a_data_error_before_the_first_step_leaves_no_empty_folders(tmp_path):
    data = tmp_path / "photos"
    data.mkdir()
    for i in range(8):
        (data / f"{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    config = tiny_config(**{"data.dataset_name": "folder", "data.data_dir": str(data)})
    with pytest.raises(errors.DatasetError, match="consecutive records could not be decoded"):
        train_lib.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "tensorboard").exists()


def test_a_signal_before_the_first_step_says_nothing_was_saved(tmp_path, monkeypatch, caplog):
    handler = signal.getsignal(signal.SIGTERM)
    real_init = train_lib.initial_params

    def init_interrupted(config):  # SIGTERM arrives while the initial weights load
        os.kill(os.getpid(), signal.SIGTERM)
        return real_init(config)

    monkeypatch.setattr(train_lib, "initial_params", init_interrupted)
    with caplog.at_level("WARNING", logger="neco_jax.train"):
        out = train_lib.train_and_evaluate(tiny_config(), tmp_path / "run")
    assert out["stopped_by_signal"] == signal.SIGTERM and out["step"] is None
    assert [r.getMessage() for r in caplog.records if r.name == "neco_jax.train"] == [
        "signal 15 before the first step: stopped, nothing was saved; rerun the same command to start"
    ]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []  # no checkpoints/, tensorboard/, metrics
    assert signal.getsignal(signal.SIGTERM) is handler
