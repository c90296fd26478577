"""End to end: the protocols on a generated VOC-layout dataset with feature extractors whose answer is known,
the numerical pieces against torch, the feature extractor against the model, and the CLI."""

import functools
import importlib
import json
import subprocess
import sys
from pathlib import Path

import eval_fixtures
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from PIL import Image
from programs import run_program

from evaluation import datasets, features, linear, overcluster
from neco_jax import errors

REPO = Path(__file__).resolve().parents[1]
PATCH = 14


@pytest.fixture(scope="module")
def voc_dir(tmp_path_factory):
    return eval_fixtures.make_voc_dataset(tmp_path_factory.mktemp("voc"), num_train=8, num_val=6)


@pytest.fixture(scope="module")
def splits(voc_dir):
    return datasets.open_dataset("voc", voc_dir, "trainaug"), datasets.open_dataset("voc", voc_dir, "val")


ORACLE = functools.partial(eval_fixtures.oracle_features, patch_size=PATCH)
NOISE = functools.partial(eval_fixtures.noise_features, patch_size=PATCH)
# A short, fast schedule: the oracle's class fractions need a large step to separate in a few epochs.
FAST_LINEAR = linear.LinearSettings(lr=10.0, epochs=10, batch_size=4, train_mask_size=56, eval_mask_size=112)


# ------------------------------------------------------------------------------------------------ protocols


def test_linear_oracle_features_score_near_100(splits):
    train, val = splits
    out = linear.evaluate(train, val, ORACLE, settings=FAST_LINEAR, image_size=112, batch_size=4)
    assert out["miou"] > 0.85, out["per_class_iou"]
    assert out["epoch_losses"][-1] < out["epoch_losses"][0]


def test_linear_noise_features_score_near_chance(splits):
    train, val = splits
    settings = linear.LinearSettings(**{**FAST_LINEAR.__dict__, "cache_features": True})
    out = linear.evaluate(train, val, NOISE, settings=settings, image_size=112, batch_size=4)
    assert out["miou"] < 0.1


def test_linear_select_best_keeps_the_best_epochs_head(splits):
    train, val = splits
    settings = linear.LinearSettings(**{**FAST_LINEAR.__dict__, "cache_features": True, "epochs": 4})
    planted = iter([0.1, 0.5, 0.5, 0.2])  # epochs 2 and 3 tie: the earlier one is kept, as the reference's
    chosen, _, scores = linear.train_head(
        train, ORACLE, settings=settings, image_size=112, val_score=lambda params: next(planted)
    )
    assert scores == [0.1, 0.5, 0.5, 0.2]
    two_epochs = linear.LinearSettings(**{**settings.__dict__, "epochs": 2})
    after_two, _, _ = linear.train_head(train, ORACLE, settings=two_epochs, image_size=112)
    last, _, none = linear.train_head(train, ORACLE, settings=settings, image_size=112)
    assert none == []
    np.testing.assert_array_equal(chosen["kernel"], after_two["kernel"])
    assert not np.array_equal(chosen["kernel"], last["kernel"])
    # The selection metric: val features once, argmax at select_mask_size, whole batches only with drop_last
    # (same batches on both sides: the oracle's noise depends on the batch).
    select = linear.LinearSettings(**{**settings.__dict__, "select_drop_last": True, "select_mask_size": 28})
    score = linear.selection_score(val, ORACLE, settings=select, image_size=112, batch_size=4, num_threads=2)
    expected = linear.evaluate_head(last, val.subset(range(4)), ORACLE, image_size=112, eval_mask_size=28)["miou"]
    assert score(last) == pytest.approx(expected, abs=1e-12)
    everything = linear.evaluate_head(last, val, ORACLE, image_size=112, eval_mask_size=28, batch_size=4)["miou"]
    select_all = linear.LinearSettings(**{**select.__dict__, "select_drop_last": False})
    assert linear.selection_score(val, ORACLE, settings=select_all, image_size=112, batch_size=4, num_threads=2)(
        last
    ) == pytest.approx(everything, abs=1e-12)


def test_linear_shuffle_switch_and_cityscapes_default():
    rng = np.random.default_rng(0)
    plain = linear._epoch_order(rng, 10, linear.LinearSettings(batch_size=4, drop_last=False))
    assert np.concatenate(plain).tolist() == list(range(10))
    shuffled = linear._epoch_order(rng, 10, linear.LinearSettings(batch_size=4, drop_last=False, shuffle=True))
    order = np.concatenate(shuffled).tolist()
    assert sorted(order) == list(range(10)) and order != list(range(10)) and [len(b) for b in shuffled] == [4, 4, 2]
    config = importlib.import_module("configs.eval.cityscapes_linear").get_config()
    assert config.linear.shuffle and not config.linear.drop_last and not config.linear.select_best


@pytest.mark.slow
def test_overcluster_oracle_features_score_near_100(splits):
    settings = overcluster.OverclusterSettings(ks=(21, 60), seeds=(0, 1), iters=30, init="kmeans++", pca_dim=12)
    out = overcluster.evaluate(splits[1], ORACLE, settings=settings, image_size=224, mask_size=100, batch_size=6)
    assert out["miou_k21"] > 0.8  # Hungarian, K = classes
    assert out["miou_k60"] > 0.9 and out["miou"] == out["miou_k60"]  # many-to-one by precision
    assert [r["k"] for r in out["runs"]] == [21, 60]


def test_overcluster_noise_features_score_near_chance(splits):
    settings = overcluster.OverclusterSettings(ks=(21, 60), seeds=(0,), iters=30, pca_dim=12)
    out = overcluster.evaluate(splits[1], NOISE, settings=settings, image_size=224, mask_size=100, batch_size=6)
    assert out["miou_k21"] < 0.1 and out["miou_k60"] < 0.1


def test_overcluster_drop_remainder_keeps_a_multiple(splits):
    settings = overcluster.OverclusterSettings(ks=(21,), seeds=(0,), iters=2, restarts=1, pca_dim=4)
    out = overcluster.evaluate(splits[1], NOISE, settings=settings, image_size=56, mask_size=20, drop_remainder=4)
    assert out["images"] == 4 and out["features"].shape[0] == 4


# ------------------------------------------------------------------------------------------------ numerics vs torch


def test_resizing_matches_torchvision_and_torch():
    import torchvision.transforms.functional as TF

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(75, 130, 3), dtype=np.uint8)
    ref = np.asarray(TF.resize(Image.fromarray(image), [64, 64]))
    np.testing.assert_array_equal(features.resize_image(image, 64), ref)
    mask = rng.integers(0, 21, size=(448, 448)).astype(np.uint8)
    for size in (100, 37, 448):
        ref = F.interpolate(torch.from_numpy(mask)[None, None].float(), size=(size, size), mode="nearest")
        np.testing.assert_array_equal(features.nearest_resize(mask, size), ref[0, 0].numpy().astype(np.uint8))
    clusters = rng.integers(0, 500, size=(3, 32, 32))
    ref = F.interpolate(torch.from_numpy(clusters)[:, None].float(), size=(100, 100), mode="nearest")
    np.testing.assert_array_equal(features.nearest_resize(clusters, 100), ref[:, 0].numpy().astype(np.int64))


def test_head_training_matches_torch():
    """Logits, loss and three SGD steps across a StepLR drop equal torch's Conv2d head on F.interpolate'd features."""
    rng = np.random.default_rng(1)
    b, h, d, c, m = 2, 5, 6, 4, 13
    feats = rng.normal(size=(b, h, h, d)).astype(np.float32)
    labels = rng.integers(0, c, size=(b, m, m))
    labels[rng.random(labels.shape) < 0.2] = 255
    params = linear.init_head(jax.random.key(0), d, c)
    settings = linear.LinearSettings(lr=0.5, epochs=3, lr_step_epochs=2, lr_gamma=0.1)

    head = torch.nn.Conv2d(d, c, 1)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(np.asarray(params["kernel"]).T[:, :, None, None].copy()))
        head.bias.copy_(torch.from_numpy(np.asarray(params["bias"])))
    opt = torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    x = F.interpolate(torch.from_numpy(feats).permute(0, 3, 1, 2), size=(m, m), mode="bilinear")
    y = torch.from_numpy(labels).long()

    logits = linear.head_logits(params, jnp.asarray(feats), m)
    np.testing.assert_allclose(np.asarray(logits), head(x).permute(0, 2, 3, 1).detach().numpy(), rtol=1e-5, atol=1e-5)

    optimizer = linear.make_optimizer(settings, steps_per_epoch=1)
    step = linear.make_train_step(optimizer, mask_size=m, ignore_index=255)
    state = optimizer.init(params)
    for _ in range(3):  # one step per epoch: epochs 0, 1 at lr 0.5, epoch 2 at 0.05
        params, state, loss = step(params, state, jnp.asarray(feats), jnp.asarray(labels))
        opt.zero_grad()
        ref_loss = torch.nn.CrossEntropyLoss(ignore_index=255)(head(x), y)
        ref_loss.backward()
        opt.step()
        sched.step()
        assert float(loss) == pytest.approx(ref_loss.item(), rel=1e-5)
    np.testing.assert_allclose(
        np.asarray(params["kernel"]), head.weight.detach()[:, :, 0, 0].numpy().T, rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(np.asarray(params["bias"]), head.bias.detach().numpy(), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------ features


@pytest.fixture(scope="module")
def tiny_model():
    from neco_jax.models import VisionTransformer, get_arch

    return VisionTransformer(get_arch("vit_tiny_test"), rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_feature_extractor_equals_the_model_sharded(tiny_model):
    assert jax.device_count() == 4  # conftest simulates 4 devices: the batch of 3 is padded and sharded
    images = np.random.default_rng(0).normal(size=(3, 56, 56, 3)).astype(np.float32)
    extractor = features.FeatureExtractor(tiny_model)
    feats, attn = extractor.with_attention(images)
    ref = tiny_model(jnp.asarray(images), deterministic=True, return_attention=True)
    np.testing.assert_allclose(feats, np.asarray(ref["x_norm_patchtokens"]).reshape(3, 4, 4, 64), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(attn, np.asarray(ref["attn_cls"]).reshape(3, 2, 4, 4), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(extractor(images), feats, rtol=1e-5, atol=1e-6)
    bf16 = features.FeatureExtractor(tiny_model, dtype="bfloat16")(images)
    assert bf16.dtype == np.float32 and np.abs(bf16 - feats).max() < 0.1 * np.abs(feats).max()


def test_extract_features_shapes(tiny_model, splits):
    extractor = features.FeatureExtractor(tiny_model)
    feats, masks = features.extract_features(extractor, splits[1], image_size=56, mask_size=20, batch_size=4)
    assert feats.shape == (6, 4, 4, 64) and masks.shape == (6, 20, 20) and masks.dtype == np.uint8


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def saved_backbone(tiny_model, tmp_path_factory):
    import neco_jax

    folder = tmp_path_factory.mktemp("backbone")
    neco_jax.save_backbone(tiny_model, folder)
    return folder


def _cli(config, voc_dir, saved_backbone, workdir, *extra):
    return run_program(
        "evaluation",
        f"--config={REPO}/configs/eval/{config}.py",
        f"--config.checkpoint={saved_backbone}",
        f"--config.data_dir={voc_dir}",
        f"--config.workdir={workdir}",
        "--config.image_size=56",
        "--config.batch_size=4",
        "--config.num_visualize=2",
        *extra,
    )


@pytest.mark.slow
def test_cli_overcluster_writes_results(voc_dir, saved_backbone, tmp_path):
    rc = _cli(
        "voc_overcluster",
        voc_dir,
        saved_backbone,
        tmp_path,
        "--config.mask_size=28",
        "--config.overcluster.ks=21,40",
        "--config.overcluster.seeds=0,1",
        "--config.overcluster.iters=5",
        "--config.overcluster.restarts=2",
        "--config.overcluster.pca_dim=16",
    )
    assert rc == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert 0 <= results["miou"] <= 1 and results["miou"] == results["miou_k40"]
    assert results["images"] == 6  # fewer than one reference batch of 32: all kept
    assert "miou_k21" in (tmp_path / "results.txt").read_text()
    assert len(list((tmp_path / "clusters").glob("*.png"))) == 2


@pytest.mark.slow
def test_cli_linear_writes_results(voc_dir, saved_backbone, tmp_path):
    rc = _cli(
        "voc_linear",
        voc_dir,
        saved_backbone,
        tmp_path,
        "--config.linear.epochs=2",
        "--config.linear.batch_size=4",
        "--config.linear.train_mask_size=28",
        "--config.linear.eval_mask_size=56",
    )
    assert rc == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert 0 <= results["miou"] <= 1 and len(results["per_class_iou"]) == 21
    assert results["config"]["linear"]["epochs"] == 2
    assert "aeroplane" in (tmp_path / "results.txt").read_text()
    assert len(list((tmp_path / "predictions").glob("*.png"))) == 2


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--config.data_dir=/no/such/folder"], "data_dir /no/such/folder does not exist"),
        (["--config.typo=1"], "--config.typo: the config has no field or section 'typo'"),
        (["--config.checkpoint=/no/such/file.pth"], "/no/such/file.pth"),
        (["--config.dtype=float16"], "config.dtype"),
        (["--config.num_classes=20"], "config.num_classes=20"),
        (["--config.image_size=56", "--config.overcluster.ks=21,300"], "K=300 clusters need"),
    ],
)
def test_cli_user_errors_are_one_line(voc_dir, saved_backbone, tmp_path, capsys, extra, message):
    rc = _cli("voc_overcluster", voc_dir, saved_backbone, tmp_path, *extra)
    err = capsys.readouterr().err
    last = err.strip().split("\n")[-1]  # progress bars may come first
    assert rc == 2 and message in last and last.startswith("error: ") and "Traceback" not in err


@pytest.mark.slow
def test_training_workdir_student_and_teacher(tmp_path):
    """A checkpoint written by the training loop's Checkpointer is read back as either backbone."""
    from configs import demo
    from neco_jax import checkpoint as ckpt_lib
    from neco_jax import train_state as ts
    from neco_jax import weights
    from neco_jax.settings import from_config

    config = demo.get_config()
    student, teacher = weights.random_params(from_config(config), 0)
    teacher = jax.tree.map(lambda x: x * 0.5, teacher)  # make the two distinguishable
    checkpointer = ckpt_lib.Checkpointer(tmp_path / "checkpoints", keep=1)
    checkpointer.save(3, ts.create(student, teacher, {}, {}, 0), {"epoch": 0})
    checkpointer.close()
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    images = np.random.default_rng(0).normal(size=(2, 56, 56, 3)).astype(np.float32)
    for which, params in (("student", student), ("teacher", teacher)):
        model = features.load_model(str(tmp_path), which=which)
        expected = nnx.merge(weights.build_models(from_config(config)).teacher_backbone, params["backbone"])
        np.testing.assert_array_equal(
            np.asarray(model(jnp.asarray(images))["x_norm_patchtokens"]),
            np.asarray(expected(jnp.asarray(images))["x_norm_patchtokens"]),
        )
    with pytest.raises(errors.CheckpointError, match="student"):
        features.load_model(str(tmp_path), which="ema")


def test_training_workdir_without_a_checkpoint_or_a_teacher_is_named(tmp_path):
    from train_fixtures import tiny_config

    from neco_jax import checkpoint as ckpt_lib
    from neco_jax import train_state as ts

    (tmp_path / "config.json").write_text(tiny_config(**{"loss.use_teacher": False}).to_json_best_effort())
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(errors.CheckpointError, match=r"checkpoints holds no finished checkpoint yet"):
        features.load_model(str(tmp_path), which="student")
    checkpointer = ckpt_lib.Checkpointer(tmp_path / "checkpoints", keep=1)
    checkpointer.save(1, ts.create({"backbone": {"w": jnp.ones(2)}, "head": {}}, {}, {}, {}, 0), {})
    checkpointer.close()
    with pytest.raises(errors.CheckpointError, match=r"trained without a teacher .*use checkpoint_model=student"):
        features.load_model(str(tmp_path), which="teacher")


def test_cli_process_exits_2_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "evaluation", "--config=configs/eval/voc_linear.py", f"--config.workdir={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: config.data_dir is not set; pass --config.data_dir=..."]


@pytest.mark.parametrize("dataset", ["voc", "coco_things", "coco_stuff", "ade20k", "cityscapes"])
@pytest.mark.parametrize("protocol", ["linear", "overcluster"])
def test_every_job_config_loads_and_is_locked(dataset, protocol):
    config = importlib.import_module(f"configs.eval.{dataset}_{protocol}").get_config()
    assert (config.dataset, config.protocol) == (dataset, protocol)
    counts = {"voc": 21, "coco_things": 12, "coco_stuff": 15, "ade20k": 151, "cityscapes": 19}
    assert config.num_classes == counts[dataset]
    with pytest.raises(AttributeError):
        config.typo = 1
    if protocol == "overcluster":
        assert tuple(config.overcluster.ks) == (config.num_classes, 300, 500)
    else:
        assert (config.linear.lr, config.linear.epochs, config.linear.batch_size) == (0.01, 25, 128)
