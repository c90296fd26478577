"""Evaluation refuses a model whose weights or features are not finite (a diverged run), with a named error and
one line from the CLI, instead of scoring it; an earlier result in the workdir stays as it was."""

from pathlib import Path

import eval_fixtures
import numpy as np
import pytest
from flax import nnx
from programs import run_program

import neco_jax
from evaluation import features
from neco_jax import errors
from neco_jax.models import VisionTransformer, get_arch

REPO = Path(__file__).resolve().parents[1]


def _tiny(**changes):
    """vit_tiny_test with some parameters replaced: {'/'-joined path: new value}."""
    model = VisionTransformer(get_arch("vit_tiny_test"), rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    for path, value in changes.items():
        var = flat[tuple(int(p) if p.isdigit() else p for p in path.split("/"))]
        var.set_value(value(var.get_value()))
    nnx.update(model, state)
    return model


def test_non_finite_weights_are_refused_by_the_cli(tmp_path, capsys):
    voc = eval_fixtures.make_voc_dataset(tmp_path / "voc", num_train=2, num_val=2)
    folder = tmp_path / "diverged"
    neco_jax.save_backbone(_tiny(**{"blocks/1/attn/qkv/kernel": lambda v: v.at[0, 3].set(np.nan)}), folder)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").write_text('{"miou": 0.5}')  # an earlier run's result
    rc = run_program(
        "evaluation",
        f"--config={REPO}/configs/eval/voc_overcluster.py",
        f"--config.checkpoint={folder}",
        f"--config.data_dir={voc}",
        f"--config.workdir={tmp_path / 'out'}",
        "--config.image_size=56",
    )
    last = capsys.readouterr().err.strip().split("\n")[-1]
    assert rc == 2 and last.startswith("error: ") and "Traceback" not in last
    assert f"{folder} has non-finite weights (NaN or inf) in 1 parameter(s), e.g. blocks/1/attn/qkv/kernel" in last
    assert (tmp_path / "out" / "results.json").read_text() == '{"miou": 0.5}'


def test_non_finite_features_from_finite_weights_are_refused():
    # Finite weights near float32's limit: the patch embedding overflows to inf, LayerNorm turns it into NaN.
    model = _tiny(**{"patch_embed/proj/kernel": lambda v: v * 0 + 3e38})
    extractor = features.FeatureExtractor(model, name="big.safetensors")
    images = np.random.default_rng(0).normal(size=(3, 56, 56, 3)).astype(np.float32)
    with pytest.raises(
        errors.NonFiniteError,
        match=r"big.safetensors gives non-finite features \(NaN or inf\) for 3 of 3 images",
    ):
        extractor(images)
