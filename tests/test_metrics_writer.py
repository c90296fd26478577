"""MetricsWriter: the JSON lines, and the TensorBoard event files read back with TensorBoard's own reader
(not the tensorboardX code that wrote them); no TensorFlow anywhere."""

import sys

import numpy as np
import pytest

from neco_jax import metrics_writer as mw

ROWS = [
    (1, {"loss": 3.25, "lr_backbone": np.float32(1e-5), "grad_norm": np.float64(0.5), "finite": True}),
    (2, {"loss": 2.75, "lr_backbone": np.float32(2e-5), "grad_norm": np.float64(1.5), "finite": True}),
    (5, {"loss": np.float32(2.125), "lr_backbone": 3e-5, "grad_norm": 0.25, "finite": False}),
]


def test_jsonl_rows_read_back(tmp_path):
    writer = mw.MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    for step, row in ROWS:
        writer.write(step, row)
    writer.close()
    rows = mw.read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 5]
    assert [r["loss"] for r in rows] == [3.25, 2.75, 2.125]
    assert rows[0]["lr_backbone"] == float(np.float32(1e-5))
    assert not (tmp_path / "tensorboard").exists()


def test_tensorboard_scalars_read_back_without_tensorflow(tmp_path):
    pytest.importorskip("tensorboardX")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = mw.MetricsWriter(tmp_path, enabled=True)
    for step, row in ROWS:
        writer.write(step, row)
    writer.close()
    assert "tensorflow" not in sys.modules

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"loss", "lr_backbone", "grad_norm", "finite"}
    for tag in ("loss", "lr_backbone", "grad_norm", "finite"):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [s for s, _ in ROWS]
        # Event files hold float32 scalars.
        np.testing.assert_array_equal([e.value for e in events], [np.float32(float(r[tag])) for _, r in ROWS])
