"""The loop's device feed: prefetch order, lookahead and loader states; batch buffers released while their
step runs; and a training run that fetches from the device only at log and checkpoint steps, with one dispatch
per step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_fixtures import SAME_STEP_DEMO

from neco_jax import device_feed


class CountingLoader:
    """A loader stand-in: numbered batches, a state that counts them, and a record of how many were read and
    which were reported."""

    def __init__(self, n):
        self.n, self.read, self.reported = n, 0, []

    def fetch(self):
        if self.read == self.n:
            raise StopIteration
        self.read += 1
        return {"x": np.full((2,), self.read), "index": np.arange(2), "skipped": np.zeros(2, np.int32)}

    def report(self, batch, state):
        self.reported.append(state["next_batch"])

    def get_state(self):
        return {"next_batch": self.read}


def test_prefetch_keeps_batches_ahead_in_order():
    loader = CountingLoader(5)
    put = lambda b: {"x": jax.device_put(b["x"])}  # noqa: E731
    feed = device_feed.prefetch(loader, put, size=2)
    got = []
    for fed in feed:
        assert loader.read == min(len(got) + 3, 5)  # the consumed batch plus two ahead
        assert loader.reported[-1] == len(got) + 1  # reported as it is handed out, not when fetched
        assert isinstance(fed.batch["x"], jax.Array)
        got.append((int(fed.batch["x"][0]), fed.data_state["next_batch"]))
    assert got == [(k, k) for k in range(1, 6)]  # the state saved with batch k resumes at k + 1


def test_skipped_images_are_warned_about_when_their_batch_is_consumed(tmp_path, caplog):
    """Unreadable files only in the 2nd and 3rd batches: after the 1st is consumed (two fetched ahead), no
    warning yet and a count of 0; after each later one, one warning per image the count includes."""
    from PIL import Image

    from input_pipeline import LoaderSettings, ViewSettings, make_train_loader

    for i in range(12):
        if i in (5, 9):  # read for batches 2 and 3 (batch 4, no shuffle): replaced by the next file
            (tmp_path / f"img_{i:02d}.png").write_bytes(b"\x89PNG\r\n\x1a\n corrupt")
        else:
            Image.fromarray(np.full((40, 40, 3), 10 * i, np.uint8)).save(tmp_path / f"img_{i:02d}.png")
    views = ViewSettings(size_crops=(28, 14), nmb_samples=(1, 1), min_scale_crops=(0.5, 0.2), max_scale_crops=(1, 0.5))
    settings = LoaderSettings(data_dir=str(tmp_path), dataset_name="folder", max_bad_fraction=1.0, num_workers=0)
    loader = make_train_loader(views, settings, batch_size=4, seed=0, shuffle=False, num_epochs=1, process=(0, 1))
    feed = device_feed.prefetch(loader, lambda b: b, size=2)
    counts = []
    with caplog.at_level("WARNING", logger="input_pipeline.loader"):
        for fed in feed:
            warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped unreadable")]
            counts.append((fed.data_state["bad_files"], len(warned)))
    assert counts == [(0, 0), (1, 1), (2, 2)], counts
    assert warned == [f"skipped unreadable image {tmp_path / f'img_{i:02d}.png'}" for i in (5, 9)]


def test_release_while_the_step_runs_frees_the_batch_and_keeps_the_result():
    """Deleting a batch's buffers right after dispatching a computation that reads them: the buffers are gone
    for the host, the computation still sees the batch (PJRT frees them after it)."""
    slow = jax.jit(lambda b: jax.lax.fori_loop(0, 200, lambda _, y: jnp.tanh(y @ b["x"]) + b["y"], b["y"]))
    host = {
        "x": np.eye(256, dtype=np.float32) * 0.5,
        "y": np.linspace(-1, 1, 256 * 256, dtype=np.float32).reshape(256, 256),
    }
    want = np.asarray(slow(jax.device_put(host)))
    batch = jax.device_put(host)
    out = slow(batch)
    device_feed.release(batch)
    assert all(x.is_deleted() for x in batch.values())
    np.testing.assert_array_equal(np.asarray(out), want)


@pytest.mark.slow
@SAME_STEP_DEMO
def test_training_loop_fetches_only_at_log_and_checkpoint_steps(tmp_path, monkeypatch):
    """4 steps, a log line every 2: no implicit device-to-host transfer at all (the transfer guard would
    raise), and host copies only at the log steps; the log rows carry the window means."""
    from train_fixtures import tiny_config

    from neco_jax import nonfinite
    from neco_jax import train as train_lib
    from neco_jax.metrics_writer import read_metrics

    c = tiny_config(**{"optim.total_steps": 4, "log_every_steps": 2})  # the demo's program, as the other tiny runs
    fetches, fed, calls = [], [], []
    real_copy, real_prefetch = train_lib.distributed.host_copy, device_feed.prefetch
    monkeypatch.setattr(train_lib.distributed, "host_copy", lambda x: fetches.append(x) or real_copy(x))
    monkeypatch.setattr(device_feed, "prefetch", lambda *a: (fed.append(f) or f for f in real_prefetch(*a)))
    real_count, real_compile = nonfinite.count, train_lib.compile_loop_step
    monkeypatch.setattr(nonfinite, "count", lambda *a: calls.append("sums") or real_count(*a))

    def counting_compile(*a, **kw):  # the loop's program, compiled ahead: each call of it counted
        fit, models = real_compile(*a, **kw)
        return dataclasses.replace(fit, compiled=lambda *b: calls.append("step") or fit.compiled(*b)), models

    monkeypatch.setattr(train_lib, "compile_loop_step", counting_compile)
    with jax.transfer_guard_device_to_host("disallow"):
        out = train_lib.train_and_evaluate(c, tmp_path)
    monkeypatch.undo()
    rows = read_metrics(tmp_path)
    assert out["step"] == 4 and [r["step"] for r in rows] == [2, 4]
    assert calls == ["sums"] + ["step"] * 4  # the sums are traced into the step: one dispatch per step
    assert len(fed) == 4 and all(x.is_deleted() for f in fed for x in jax.tree.leaves(f.batch))
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm_mean"]) for r in rows)
    metric_fetches = [x for x in fetches if isinstance(x, tuple) and "loss_sum" in x[0]]
    # one per log row, and three whatever the run's length: the start step, the parameter overview, the end step
    assert len(metric_fetches) == 2 and len(fetches) == 2 + 3, fetches
