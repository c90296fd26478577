"""The memory check before the first step and model.remat="auto" (neco_jax/memory_fit.py), on the CPU with a faked
device memory: the choice is the cheapest that fits XLA's account of the compiled program, and a step that fits
under no choice ends in one line (exit status 2 from main.py) naming the need, the memory and what would fit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from train_fixtures import SAME_STEP_DEMO, tiny_config

from neco_jax import memory_fit
from neco_jax import train as train_lib
from neco_jax.errors import StepMemoryError, UserError
from neco_jax.models import VisionTransformer, get_arch


def _compile_vit_step(remat: str):
    """A tiny ViT's forward and backward pass at 112 px, batch 8, built with the remat choice."""
    cfg = get_arch("vit_tiny_test", **memory_fit.REMAT_FIELDS[remat])
    graphdef, params = nnx.split(nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0))))

    def loss(p, x):
        return jnp.sum(nnx.merge(graphdef, p)(x)["x_norm_patchtokens"] ** 2)

    return jax.jit(jax.grad(loss)).lower(params, jax.ShapeDtypeStruct((8, 112, 112, 3), jnp.float32)).compile()


# The tests of `peaks` run on one pytest-xdist worker, which compiles its three programs once.
SAME_PEAKS = pytest.mark.xdist_group("memory_fit_peaks")


@pytest.fixture(scope="module")
def peaks():
    return {c: memory_fit.StepMemory.of(_compile_vit_step(c)).peak for c in memory_fit.REMAT_CHOICES}


@SAME_PEAKS
def test_auto_takes_the_cheapest_choice_that_fits(peaks):
    assert peaks["none"] > peaks["dots"] > peaks["full"]  # what makes the order meaningful
    for limit, chosen in ((None, "none"), (peaks["none"], "none"), (peaks["dots"], "dots"), (peaks["full"], "full")):
        result = memory_fit.fit(_compile_vit_step, "auto", limit)
        assert result.fits and result.remat == chosen
        assert [c for c, _ in result.tried] == list(
            memory_fit.REMAT_CHOICES[: memory_fit.REMAT_CHOICES.index(chosen) + 1]
        )
        assert result.memory.peak == peaks[chosen]
    # bytes held beside the program count too; a set choice is the only one tried
    assert memory_fit.fit(_compile_vit_step, "auto", peaks["dots"], extra=1).remat == "full"
    assert not memory_fit.fit(_compile_vit_step, "dots", peaks["full"]).fits


@SAME_PEAKS
def test_nothing_fits_names_need_memory_and_remedies(peaks):
    limit = peaks["full"] - 1
    result = memory_fit.fit(_compile_vit_step, "auto", limit)
    assert not result.fits and len(result.tried) == 3
    message = memory_fit.no_fit_message(
        result, limit, "a test device", dtype="float32", batch_size=8, devices=1, remat="auto"
    )
    assert "\n" not in message
    assert f"{peaks['full'] / 2**30:.1f} GiB per device" in message and "a test device has" in message
    assert "model.dtype=bfloat16" in message and "optim.batch_size=" in message and "devices at this batch" in message


@SAME_STEP_DEMO
def test_trainer_stops_before_the_first_step_when_the_step_does_not_fit(tmp_path, monkeypatch):
    """The tiny run's own step (model.remat="none", so one compilation, the one the tiny runs share), with the
    devices' memory faked at 1 MiB: a one-line error before any step runs, and nothing of a run recorded."""
    monkeypatch.setattr(memory_fit, "device_limit", lambda devices: 2**20)
    config = tiny_config(**{"optim.total_steps": 4, "model.remat": "none"})
    with pytest.raises(StepMemoryError) as info:
        train_lib.train_and_evaluate(config, tmp_path)
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message
    assert "GiB per device" in message and "has 0.0 GiB" in message
    assert "model.remat=auto" in message and "model.dtype=bfloat16" in message
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "config.json").exists()


@SAME_PEAKS
def test_a_compiler_that_refuses_a_program_too_big_is_a_choice_that_does_not_fit(peaks):
    """libtpu's compiler refuses a program larger than the chip instead of compiling it: that choice does not fit,
    with the need it names, and the next is tried (a plan, or the trainer on a TPU, never stops on its error)."""
    message = "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (21.60G)"
    message += " exceeds available HBM (15.75G)."

    def compile_with(remat):
        if remat == "none":
            raise RuntimeError(message)
        return _compile_vit_step(remat)

    result = memory_fit.fit(compile_with, "auto", peaks["dots"])
    assert result.remat == "dots" and result.tried[0][1].temporaries == int(21.6 * 2**30)
    assert memory_fit.compiler_refusal(RuntimeError("INTERNAL: something else")) is None
    with pytest.raises(RuntimeError, match="something else"):
        memory_fit.fit(lambda remat: (_ for _ in ()).throw(RuntimeError("INTERNAL: something else")), "auto", None)
