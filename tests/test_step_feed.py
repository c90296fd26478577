"""The loop's device feed: prefetch order, lookahead and loader states; batch buffers released while their
step runs; metric sums on the device against NumPy; and a training run that fetches from the device only at
log and checkpoint steps, with one dispatch per step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_fixtures import SAME_STEP_4_TINY_STEPS

from neco_jax import step_feed


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
    feed = step_feed.prefetch(loader, put, size=2)
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

    from input_pipeline import make_train_loader

    for i in range(12):
        if i in (5, 9):  # read for batches 2 and 3 (batch 4, no shuffle): replaced by the next file
            (tmp_path / f"img_{i:02d}.png").write_bytes(b"\x89PNG\r\n\x1a\n corrupt")
        else:
            Image.fromarray(np.full((40, 40, 3), 10 * i, np.uint8)).save(tmp_path / f"img_{i:02d}.png")
    data = {"size_crops": [28, 14], "nmb_samples": [1, 1], "min_scale_crops": [0.5, 0.2], "max_scale_crops": [1, 0.5]}
    loader = make_train_loader(
        {**data, "data_dir": str(tmp_path), "dataset_name": "folder", "max_bad_fraction": 1.0},
        batch_size=4,
        seed=0,
        shuffle=False,
        num_epochs=1,
        process_index=0,
        process_count=1,
        worker_count=0,
    )
    feed = step_feed.prefetch(loader, lambda b: b, size=2)
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
    step_feed.release(batch)
    assert all(x.is_deleted() for x in batch.values())
    np.testing.assert_array_equal(np.asarray(out), want)


def _run_sums(losses, norms, cap, start=10, run=0):
    sums = step_feed.empty_sums(run)
    for i, (loss, norm) in enumerate(zip(losses, norms)):
        metrics = {
            "loss": jnp.float32(loss),
            "grad_norm": jnp.float32(norm),
            "finite": jnp.bool_(np.isfinite(loss) & np.isfinite(norm)),
        }
        sums = step_feed.accumulate(sums, metrics, start + i, cap)
    return jax.device_get(sums)


def test_sums_match_numpy_with_nonfinite_steps():
    losses = np.array([1.5, np.nan, 2.0, np.inf, np.nan, 0.25, 3.0], np.float32)
    norms = np.array([0.5, 1.0, np.nan, 2.0, 3.0, 0.125, np.inf], np.float32)
    sums = _run_sums(losses, norms, cap=3)
    bad = ~(np.isfinite(losses) & np.isfinite(norms))
    assert int(sums["steps"]) == 7 and int(sums["nonfinite"]) == bad.sum() == 5
    assert int(sums["first_nonfinite_step"]) == 11 and np.isnan(sums["first_nonfinite_loss"])
    assert float(sums["first_nonfinite_grad_norm"]) == 1.0 and int(sums["run"]) == 1
    assert int(sums["alarm_step"]) == 13 and float(sums["alarm_grad_norm"]) == 2.0  # steps 11, 12, 13 in a row
    assert int(_run_sums(losses, norms, cap=1)["alarm_step"]) == 11
    assert int(_run_sums(losses, norms, cap=4)["alarm_step"]) == 14
    assert int(_run_sums(losses, norms, cap=5)["alarm_step"]) == -1
    assert int(_run_sums(losses[:1], norms[:1], cap=2, run=5)["run"]) == 0
    assert int(_run_sums(losses[1:2], norms[1:2], cap=2, run=1)["alarm_step"]) == 10  # the run continues
    window = step_feed.LogWindow()
    window.add(sums)
    assert np.isnan(window.means()["loss"])  # a non-finite step shows in the window mean, as before
    window.add(_run_sums([2.0] * 3, [4.0] * 3, cap=1))
    assert window.means() == {"loss": 2.0, "grad_norm_mean": 4.0} and window.steps == 0


@pytest.mark.slow
@SAME_STEP_4_TINY_STEPS
def test_training_loop_fetches_only_at_log_and_checkpoint_steps(tmp_path, monkeypatch):
    """4 steps, a log line every 2: no implicit device-to-host transfer at all (the transfer guard would
    raise), and host copies only at the log steps; the log rows carry the window means."""
    from train_fixtures import tiny_config

    from neco_jax import train as train_lib
    from neco_jax.metrics_writer import read_metrics

    c = tiny_config(**{"optim.total_steps": 4, "log_every_steps": 2})  # the program of the other 4-step tiny runs
    fetches, fed, calls = [], [], []
    real_copy, real_prefetch = train_lib.distributed.host_copy, step_feed.prefetch
    monkeypatch.setattr(train_lib.distributed, "host_copy", lambda x: fetches.append(x) or real_copy(x))
    monkeypatch.setattr(step_feed, "prefetch", lambda *a: (fed.append(f) or f for f in real_prefetch(*a)))
    real_accumulate, real_jit_step = step_feed.accumulate, train_lib.jit_train_step
    monkeypatch.setattr(step_feed, "accumulate", lambda *a: calls.append("sums") or real_accumulate(*a))

    def counting_jit_step(*a, **kw):
        step = real_jit_step(*a, **kw)
        return lambda *b: calls.append("step") or step(*b)

    monkeypatch.setattr(train_lib, "jit_train_step", counting_jit_step)
    with jax.transfer_guard_device_to_host("disallow"):
        out = train_lib.train_and_evaluate(c, tmp_path)
    monkeypatch.undo()
    rows = read_metrics(tmp_path)
    assert out["step"] == 4 and [r["step"] for r in rows] == [2, 4]
    assert calls == ["step", "sums"] + ["step"] * 3  # the sums are traced into the step: one dispatch per step
    assert len(fed) == 4 and all(x.is_deleted() for f in fed for x in jax.tree.leaves(f.batch))
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm_mean"]) for r in rows)
    metric_fetches = [x for x in fetches if isinstance(x, tuple) and "loss_sum" in x[0]]
    # one per log row, and three whatever the run's length: the start step, the parameter overview, the end step
    assert len(metric_fetches) == 2 and len(fetches) == 2 + 3, fetches
