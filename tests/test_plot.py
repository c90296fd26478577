"""neco_jax.curves and python -m neco_jax.plot: the curves drawn are the metrics.jsonl values, resumes are marked, the PNG is whole,
and it works on a run that is still writing. The evaluation's charts and panels (same matplotlib): what they show."""

import json

import numpy as np
import pytest
from PIL import Image
from programs import run_program

from neco_jax import curves


def _rows(steps):
    return [
        {
            "step": s,
            "loss": 4.0 - 0.01 * s,
            "loss_last": 4.1 - 0.01 * s,
            "lr_backbone": 1e-5 * s,
            "lr_heads": 2e-5 * s,
            "weight_decay": 0.04 + 1e-4 * s,
            "momentum": 0.99 + 1e-4 * s,
            "grad_norm": 1.0 + s,
            "images_per_s": 100.0 + s,
            "step_time_s": 0.5,
            "eta_s": 0.5 * (100 - s),
        }
        for s in steps
    ]


def _workdir(tmp_path, rows, starts=(), torn_line=""):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + torn_line)
    if starts:
        (tmp_path / "starts.jsonl").write_text("".join(json.dumps({"time": "t", "step": s}) + "\n" for s in starts))
    return tmp_path


def test_panels_hold_the_logged_values_and_resumes_are_marked(tmp_path):
    rows = _rows(range(5, 65, 5))
    fig = curves.make_figure(rows, [20, 40], "run")
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == [p[0] for p in curves.PANELS]
    for ax, (_, series, _) in zip(axes, curves.PANELS):
        drawn = [line for line in ax.get_lines() if line.get_linestyle() == "-"]
        assert len(drawn) == len(series)
        for line, (key, _) in zip(drawn, series):
            np.testing.assert_array_equal(line.get_xdata(), [r["step"] for r in rows])
            np.testing.assert_array_equal(line.get_ydata(), [r[key] for r in rows])
        marks = [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"]
        assert marks == [20, 40]
    assert axes[1].get_yscale() == "log" and axes[0].get_yscale() == "linear"


def test_workdir_plot_while_running_and_cli(tmp_path, capsys):
    # A run that resumed at step 20 and is writing its next line right now.
    workdir = _workdir(tmp_path, _rows(range(5, 35, 5)), starts=[0, 20], torn_line='{"step": 35, "lo')
    assert run_program("neco_jax.plot", str(workdir)) == 0
    assert capsys.readouterr().out.strip() == f"wrote {workdir / 'metrics.png'}"
    with Image.open(workdir / "metrics.png") as img:
        assert img.format == "PNG" and img.size == (960, 520)
        img.load()  # the whole file decodes
    assert run_program("neco_jax.plot", str(workdir), "--out", str(tmp_path / "other.png")) == 0
    assert (tmp_path / "other.png").is_file()


def test_missing_values_are_shown_as_not_logged():
    rows = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
    fig = curves.make_figure(rows, [])
    texts = [[t.get_text() for t in ax.texts] for ax in fig.axes]
    assert texts[0] == [] and all(t == ["not logged"] for t in texts[1:])


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "metrics.jsonl has no rows yet"),
        (lambda p: (p / "metrics.jsonl").write_text('{"step": 1, "lo'), "metrics.jsonl has no rows yet"),
    ],
)
def test_bad_workdir_is_one_line_exit_2(tmp_path, capsys, setup, message):
    setup(tmp_path)
    assert run_program("neco_jax.plot", str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "metrics.png").exists()


# ---- the evaluation's pictures (evaluation/plots.py, evaluation/visualize.py), drawn with the same matplotlib


def test_bar_chart_draws_each_value_and_leaves_gaps():
    from evaluation import plots

    series = {"this checkpoint": [70.1, 40.2, 30.5], "paper": [81.3, None, 33.0]}
    ax = plots.bar_chart_figure(["voc\nlinear", "voc\nK=21", "ade20k\nlinear"], series, "ckpt").axes[0]
    ours, paper = ax.containers
    assert [b.get_height() for b in ours] == series["this checkpoint"]
    assert [b.get_height() for b in paper] == [81.3, 33.0]  # no bar where the paper has no number
    assert [round(b.get_x() + b.get_width() / 2) for b in paper] == [0, 2]  # beside their own group
    assert [t.get_text() for t in ax.get_xticklabels()] == ["voc\nlinear", "voc\nK=21", "ade20k\nlinear"]


def test_panel_row_shows_every_array_at_the_first_size(tmp_path):
    from evaluation import plots, visualize

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (56, 40, 3), dtype=np.uint8)
    labels = rng.integers(0, 21, (28, 20))
    path = visualize.save_panel_row([image, labels], tmp_path / "row.png", ["image", "labels"])
    fig = plots.panel_row_figure([image, visualize.label_colors(labels)], ["image", "labels"])
    shown = [ax.get_images()[0] for ax in fig.axes]
    np.testing.assert_array_equal(shown[0].get_array(), image)
    np.testing.assert_array_equal(shown[1].get_array(), visualize.class_palette()[labels])  # the VOC colours
    assert all(im.get_extent() == [0, 40, 56, 0] for im in shown)  # both at the image's size
    assert [ax.get_title() for ax in fig.axes] == ["image", "labels"]
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] > png.size[1] > 0
        png.load()
