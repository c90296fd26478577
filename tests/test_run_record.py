"""The workdir's record of its starts: config comparison on resume, earlier configs kept, metrics rows of
replayed steps set aside, unwritable workdirs named."""

import json

import pytest

from configs import demo
from neco_jax import errors, run_record
from neco_jax import metrics_writer as mw


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_resume_with_a_computation_change_is_refused_and_listed(tmp_path):
    old = demo.get_config()
    run_record.record_start(str(tmp_path), old, 0)
    before = _files(tmp_path)
    new = demo.get_config()
    new.optim.total_steps, new.model.num_register_tokens, new.log_every_steps = 80, 4, 1
    with pytest.raises(errors.ConfigChangedError) as info:
        run_record.check_resume(str(tmp_path), new, allow_change=False)
    assert str(info.value) == (
        f"{tmp_path}/config.json differs from this config in fields that change the computation: "
        "model.num_register_tokens: 0 -> 4; optim.total_steps: 40 -> 80. Resume with the stored config, use a "
        "fresh --workdir, or pass --allow_config_change to continue the checkpoint with the new values"
    )
    assert _files(tmp_path) == before  # the check writes nothing
    # allowed: every difference is returned, bookkeeping ones included
    assert run_record.check_resume(str(tmp_path), new, allow_change=True) == [
        "log_every_steps: 5 -> 1",
        "model.num_register_tokens: 0 -> 4",
        "optim.total_steps: 40 -> 80",
    ]


def test_bookkeeping_changes_resume_freely(tmp_path):
    run_record.record_start(str(tmp_path), demo.get_config(), 0)
    new = demo.get_config()
    new.log_every_steps, new.checkpoint_every_steps, new.data.num_workers, new.model.init = 1, 7, 2, "/elsewhere"
    new.eval.every_epochs, new.stop_check_every_steps = 1, 3
    assert len(run_record.check_resume(str(tmp_path), new, allow_change=False)) == 6


def test_every_start_is_kept(tmp_path):
    """Same config: config.json unchanged; a changed one moves the earlier to config.1.json, config.2.json..."""
    a, b = demo.get_config(), demo.get_config()
    b.optim.lr_heads = 2e-3
    assert run_record.record_start(str(tmp_path), a, 0) is None
    first = (tmp_path / "config.json").read_text()
    assert run_record.record_start(str(tmp_path), a, 20) is None
    assert (tmp_path / "config.json").read_text() == first and not (tmp_path / "config.1.json").exists()
    assert run_record.record_start(str(tmp_path), b, 30) == "config.1.json"
    assert run_record.record_start(str(tmp_path), a, 40) == "config.2.json"
    assert (tmp_path / "config.1.json").read_text() == first
    assert json.loads((tmp_path / "config.2.json").read_text())["optim"]["lr_heads"] == 2e-3
    assert (tmp_path / "config.json").read_text() == first
    starts = [json.loads(line) for line in (tmp_path / "starts.jsonl").read_text().splitlines()]
    assert [(s["step"], s["previous_config"], s["changes"]) for s in starts] == [
        (0, None, []),
        (20, None, []),
        (30, "config.1.json", ["optim.lr_heads: 0.001 -> 0.002"]),
        (40, "config.2.json", ["optim.lr_heads: 0.002 -> 0.001"]),
    ]


def test_unreadable_stored_config_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(errors.ConfigChangedError, match=r"config.json cannot be read .*move it away"):
        run_record.check_resume(str(tmp_path), demo.get_config(), allow_change=False)
    assert (tmp_path / "config.json").read_text() == "{not json"


def test_unwritable_workdir_is_named(tmp_path):
    (tmp_path / "file").write_text("kept")
    with pytest.raises(errors.WorkdirError, match=r"^cannot write to the workdir .*file/run \(Not a directory\)"):
        run_record.prepare_workdir(str(tmp_path / "file" / "run"))
    assert (tmp_path / "file").read_text() == "kept"
    run_record.prepare_workdir(str(tmp_path / "ok"))
    assert list((tmp_path / "ok").iterdir()) == []  # the probe leaves nothing behind


def test_rows_of_replayed_steps_are_set_aside(tmp_path):
    rows = [{"step": s, "loss": float(s)} for s in (1, 2, 3, 4)]
    (tmp_path / mw.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')
    assert mw.set_aside_rows_after(tmp_path, 2) == 3
    assert mw.read_metrics(tmp_path) == rows[:2]
    replaced = [json.loads(line) for line in (tmp_path / mw.REPLACED_FILE).read_text().splitlines()]
    assert replaced == [{**r, "replaced_on_resume_from_step": 2} for r in rows[2:]] + [
        {"unparsable_row": '{"step": 5, "lo', "replaced_on_resume_from_step": 2}
    ]
    assert mw.set_aside_rows_after(tmp_path, 2) == 0 and mw.read_metrics(tmp_path) == rows[:2]
