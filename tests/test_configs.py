"""Recipe configs: the original's values (vpariza/NeCo experiments/configs/; docs/method.md), ablation presets, and config errors."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from train_fixtures import RECIPES

from configs import base
from neco_jax import errors, settings

ROOT = Path(__file__).resolve().parents[1]


def _cfg(name, arg=None):
    return importlib.import_module(f"configs.{name}").get_config(arg)


def _check(config):
    """What the trainer checks before it builds anything."""
    settings.check_runnable(settings.from_config(config))


def test_shared_values_are_the_originals():
    c = _cfg("dinov2_s14")
    assert c.seed == 400
    assert (c.model.arch, c.model.init, c.model.num_register_tokens, c.model.drop_path_rate) == (
        "vit_small_patch14_dinov2",
        "dinov2_vits14",
        0,
        0.1,
    )
    assert (c.head.hidden_dim, c.head.out_dim, c.head.num_layers) == (2048, 256, 3)
    assert tuple(c.data.size_crops) == (518, 98) and tuple(c.data.nmb_samples) == (2, 4)
    assert tuple(c.data.min_scale_crops) == (0.25, 0.05) and tuple(c.data.max_scale_crops) == (1.0, 0.25)
    assert c.data.min_intersection_crops == 0.01 and c.data.dataset_name == "coco"
    o = c.optim
    assert (o.batch_size, o.num_epochs, o.lr_backbone, o.lr_heads, o.final_lr) == (64, 25, 1e-5, 1e-4, 0.0)
    assert (o.weight_decay, o.weight_decay_end, o.exclude_norm_bias) == (0.04, 0.5, True)
    assert (c.ema.momentum, c.ema.momentum_end) == (0.9995, 1.0)
    l = c.loss  # noqa: E741
    assert (l.student_steepness, l.teacher_steepness, l.sort_net, l.distribution, l.sim_dist) == (
        100.0,
        100.0,
        "bitonic",
        "cauchy",
        "cosine",
    )
    assert (l.roi_align_kernel_size, l.queue_length, l.use_queue, l.use_teacher, l.loss_mask) == (
        7,
        8192,
        True,
        True,
        "all",
    )


@pytest.mark.parametrize(
    "name,expect",
    [
        ("dinov2r_s14", dict(init="dinov2_vits14_reg", regs=4, bs=64, lr=1e-5, arch="vit_small_patch14_dinov2")),
        ("dinov2r_xr_s14", dict(init="dinov2_vits14_reg", regs=0, bs=64, lr=1e-5, arch="vit_small_patch14_dinov2")),
        ("dinov2_b14", dict(init="dinov2_vitb14", regs=0, bs=16, lr=5e-6, arch="vit_base_patch14_dinov2")),
        ("dinov2r_b14", dict(init="dinov2_vitb14_reg", regs=4, bs=16, lr=1e-6, arch="vit_base_patch14_dinov2")),
        ("dinov2r_xr_b14", dict(init="dinov2_vitb14_reg", regs=0, bs=16, lr=1e-6, arch="vit_base_patch14_dinov2")),
    ],
)
def test_dinov2_recipes(name, expect):
    c = _cfg(name)
    assert (c.model.init, c.model.num_register_tokens, c.optim.batch_size, c.optim.lr_backbone, c.model.arch) == (
        expect["init"],
        expect["regs"],
        expect["bs"],
        expect["lr"],
        expect["arch"],
    )
    assert c.loss.use_queue and tuple(c.data.size_crops) == (518, 98) and c.optim.num_epochs == 25


@pytest.mark.parametrize("name,init", [("dino_s16", "dino_vits16"), ("timet_s16", ""), ("leopart_s16", "")])
def test_dino_recipes(name, init):
    c = _cfg(name)
    assert c.model.arch == "vit_small_patch16_dino" and c.model.init == init
    assert tuple(c.data.size_crops) == (224, 98) and c.optim.batch_size == 45 and c.optim.num_epochs == 50
    assert not c.loss.use_queue and c.optim.lr_backbone == 1e-5


def test_user_checkpoint_recipes_need_an_init():
    with pytest.raises(errors.ConfigError, match="--config.model.init="):
        _check(_cfg("timet_s16"))


@pytest.mark.parametrize(
    "arg,fields",
    [
        (
            "steepness_10_1000",
            {"loss.student_steepness": 10.0, "loss.teacher_steepness": 1000.0, "loss.sort_net": "bitonic"},
        ),
        ("odd_even", {"loss.sort_net": "odd_even"}),
        ("fg", {"loss.loss_mask": "fg", "data.dataset_name": "voc", "loss.sort_net": "odd_even"}),
        ("bg", {"loss.loss_mask": "bg", "data.dataset_name": "voc"}),
        ("no_teacher", {"loss.use_teacher": False, "data.dataset_name": "voc"}),
        ("in100", {"data.dataset_name": "imagenet100k"}),
    ],
)
def test_ablation_presets(arg, fields):
    c = _cfg("dinov2r_xr_s14", arg)
    # the original's ablation setup: 224 px, batch 55, 50 epochs, lr 1e-6, no queue, registers dropped
    assert tuple(c.data.size_crops) == (224, 98) and c.optim.batch_size == 55 and c.optim.num_epochs == 50
    assert c.optim.lr_backbone == 1e-6 and not c.loss.use_queue and c.model.num_register_tokens == 0
    for dotted, value in fields.items():
        section, key = dotted.split(".")
        assert c[section][key] == value, dotted
    c.data.data_dir = "/data/given/by/the/user"
    _check(c)


def test_unknown_ablation_is_named():
    with pytest.raises(errors.ConfigError, match="unknown config argument 'odd-even'"):
        _cfg("dinov2_s14", "odd-even")


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_passes_the_checks(name):
    c = _cfg(name)
    if not c.model.init:
        c.model.init = "/path/given/by/the/user.pth"
    if name != "demo":
        c.data.data_dir = "/data/given/by/the/user"
    _check(c)


def test_real_recipe_without_data_dir_is_refused():
    """The bundled sample photos train only when asked for (the demo, dataset_name="sample")."""
    with pytest.raises(errors.ConfigError, match=r"^config.data.data_dir is empty: set --config.data.data_dir="):
        _check(_cfg("dinov2_s14"))
    assert _cfg("demo").data.dataset_name == "sample"
    c = base.set_fields(_cfg("dinov2_s14"), {"data.dataset_name": "sample"})
    _check(c)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("optim.on_nonfinite", "ignore", "on_nonfinite"),
        ("loss.sort_net", "bubble", "sort_net"),
        ("optim.batch_size", 0, "batch_size"),
        ("optim.lr_heads", -1.0, "lr_heads"),
        ("ema.momentum", 1.5, "momentum"),
        ("loss.sim_dist", "manhattan", r"^config.loss.sim_dist='manhattan' is not one of \('cosine', 'euclidean'\)$"),
        # NaN passes every `x < 0` check: each number must be finite
        ("optim.lr_backbone", float("nan"), r"^config.optim.lr_backbone=nan is not a finite number$"),
        ("optim.final_lr", float("inf"), r"^config.optim.final_lr=inf is not"),
        ("loss.teacher_steepness", float("nan"), r"^config.loss.teacher_steepness=nan is not"),
        ("data.max_scale_crops", (1.0, float("nan")), r"^config.data.max_scale_crops\[1\]=nan is not"),
        ("optim.grad_clip_norm", -1.0, "grad_clip_norm"),
        ("model.drop_path_rate", 1.0, "drop_path_rate"),
        ("optim.max_consecutive_skips", 0, "max_consecutive_skips"),
        ("model.num_register_tokens", -4, "num_register_tokens"),
        # a tuple element of the wrong kind, as a command-line override like "(56,abc)" or "(56,28.5)" gives
        ("data.size_crops", (56, "abc"), r"^config.data.size_crops=\(56, 'abc'\) must be a tuple of whole numbers"),
        ("data.nmb_samples", (2, 2.5), r"^config.data.nmb_samples=\(2, 2.5\) must be a tuple of whole numbers"),
        ("data.max_scale_crops", (1.0, None), r"^config.data.max_scale_crops=\(1.0, None\) must be a tuple of numbers"),
        # the original's DINOv2 backbone asserts that crops are a whole number of patches (the demo's ViT is one)
        ("data.size_crops", (56, 30), r"local crop side 30 px is not a multiple of the patch size 14 .* use 28 or 42"),
    ],
)
def test_bad_values_are_named(field, value, match):
    c = _cfg("demo")
    base.set_fields(c, {field: value})
    with pytest.raises(errors.ConfigError, match=match):
        _check(c)


def test_crops_a_dino_backbone_cuts_short_are_a_warning_naming_the_pixels(caplog):
    """The DINO recipes' 98-px local crops at patch 16: the original's DINO ViT (a strided conv) drops 2 pixels."""
    c = base.set_fields(_cfg("dino_s16"), {"model.init": "random", "data.dataset_name": "sample"})
    with caplog.at_level("WARNING", logger="neco_jax.settings"):
        _check(c)
    assert [r.getMessage() for r in caplog.records] == [
        "config.data.size_crops=(224, 98): the local crop side 98 px is not a multiple of the patch size 16 of "
        "vit_small_patch16_dino: the patch embedding sees 6 x 6 patches and drops the last 2 pixel rows and "
        "columns of every local crop, as the original does"
    ]


def test_set_fields_rejects_unknown_names():
    with pytest.raises(KeyError, match="optim.batchsize"):
        base.set_fields(_cfg("demo"), {"optim.batchsize": 3})


def _cli(*args):
    return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--config=configs/demo.py", "--config.optim.batchsize=3"],
            "--config.optim.batchsize: the config has no field or section 'batchsize' (did you mean 'batch_size'?)",
        ),
        (
            ["--config=configs/demo.py", "--config.optimx.lr=3"],
            "--config.optimx.lr: the config has no field or section 'optimx' (did you mean 'optim'?)",
        ),
        (["--config=configs/nope.py"], "config file 'configs/nope.py' does not exist"),
        (["--config=configs/demo.py:oddeven"], "unknown config argument 'oddeven'; choose one of bg, fg,"),
        (["--config=configs/dinov2_s14.py"], "config.data.data_dir is empty"),
        (["--config=configs/demo.py", "--config.optim.lr_heads=inf"], "config.optim.lr_heads=inf is not a finite"),
        (
            ["--config=configs/demo.py", "--config.data.size_crops=(56,abc)"],
            "config.data.size_crops=('(56,abc)',) must be a tuple of whole numbers, e.g. "
            '--config.data.size_crops="(518, 98)"',
        ),
    ],
)
def test_cli_config_errors_are_one_line_exit_2(tmp_path, args, message):
    """An unknown field or section, a missing file, an unknown recipe argument, a bad value: one line, exit 2,
    and the workdir's existing record is untouched."""
    (tmp_path / "config.json").write_text("{}")
    proc = _cli(*args, f"--workdir={tmp_path}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: " + message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    assert (tmp_path / "config.json").read_text() == "{}"


def test_cli_unwritable_workdir_is_one_line_exit_2(tmp_path):
    (tmp_path / "file").write_text("kept")
    proc = _cli("--config=configs/demo.py", f"--workdir={tmp_path / 'file' / 'run'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        f"error: cannot write to the workdir {tmp_path / 'file' / 'run'} (Not a directory); choose a writable "
        "--workdir or fix its permissions"
    ]
    assert (tmp_path / "file").read_text() == "kept"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the not-a-folder case covers it")
def test_cli_read_only_workdir_is_one_line_exit_2(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    proc = _cli("--config=configs/demo.py", f"--workdir={tmp_path / 'ro'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        f"error: cannot write to the workdir {tmp_path / 'ro'} (Permission denied); choose a writable --workdir "
        "or fix its permissions"
    ]
    assert list((tmp_path / "ro").iterdir()) == []


def test_cli_user_error_is_one_line_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "main.py", "--config=configs/timet_s16.py", f"--workdir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: config.model.init is empty")
    assert "Traceback" not in proc.stderr
