"""The deviceless planner (neco_jax/plan): targets, the HLO traffic account against a hand count, the demo
recipe's real training step (at its smallest shapes, tests/smallest_config.py) compiled for a GPU (bf16, cuDNN
attention) and a TPU slice, and the CLI's one-line errors."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import pytest
import smallest_config
from programs import run_program

from neco_jax.errors import ConfigError, UserError
from neco_jax.plan import hlo_traffic, targets

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALLEST = Path(__file__).resolve().parent / "smallest_config.py"
pytestmark = pytest.mark.xdist_group("plan")  # one worker compiles for the TPU and GPU targets, one after another


def test_targets_by_name():
    h100 = targets.get_target("h100-80gb")
    assert (h100.platform, h100.topology) == ("cuda", "1x1x1")
    assert h100.device_memory() == 81559 * 2**20  # nvidia-smi's 81559 MiB
    assert targets.get_target("8xa100-40gb").topology == "1x1x8"
    assert targets.get_target("a100-40gb").device_memory() == 40 * 2**30
    v5e = targets.get_target("tpu-v5e-8")
    assert (v5e.platform, v5e.topology, v5e.device_memory()) == ("tpu", "v5e:2x4", int(15.75 * 2**30))
    for bad in ("h200", "2xtpu-v5e-8", "0xh100-80gb"):
        with pytest.raises(ConfigError, match="unknown target"):
            targets.get_target(bad)


def test_missing_extra_is_one_line_naming_it(monkeypatch):
    monkeypatch.setattr(targets, "_importable", lambda module: False)
    for name, what in (("h100-80gb", "CUDA plugin"), ("tpu-v5e-8", "libtpu")):
        with pytest.raises(UserError, match=f"{what}.*neco-jax\\[plan\\]"):
            targets.check_installed(targets.get_target(name))


HLO = """HloModule jit_f, is_scheduled=true

%fused_tanh (param_0: f32[256,256]) -> f32[256,256] {
  %param_0 = f32[256,256]{1,0} parameter(0)
  ROOT %tanh = f32[256,256]{1,0} tanh(%param_0)
}

%body (p: (s32[], f32[256,256])) -> (s32[], f32[256,256]) {
  %p = (s32[], f32[256,256]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[256,256]{1,0} get-tuple-element(%p), index=1
  %gemm = (f32[256,256]{1,0}, s8[1024]{0}) custom-call(%x, %x), custom_call_target="__cublas$gemm"
  %y = f32[256,256]{1,0} get-tuple-element(%gemm), index=0
  %t = f32[256,256]{1,0} fusion(%y), kind=kLoop, calls=%fused_tanh
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %out = (s32[], f32[256,256]{1,0}) tuple(%next, %t)
}

%cond (p.1: (s32[], f32[256,256])) -> pred[] {
  %p.1 = (s32[], f32[256,256]{1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  %n = s32[] constant(12)
  ROOT %lt = pred[] compare(%i.1, %n), direction=LT
}

ENTRY %main (x.1: f32[256,256]) -> bf16[256,256] {
  %x.1 = f32[256,256]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[256,256]{1,0}) tuple(%zero, %x.1)
  %loop = (s32[], f32[256,256]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"12"}}
  %r = f32[256,256]{1,0} get-tuple-element(%loop), index=1
  ROOT %c = bf16[256,256]{1,0} convert(%r)
}
"""


def test_traffic_counts_kernels_and_loop_trips():
    a = 256 * 256 * 4  # one f32[256,256]
    gemm = 2 * a + (a + 1024)  # reads x twice, writes its result and its workspace
    tanh = a + a
    add = 4 + 4 + 4
    body = gemm + tanh + add
    convert = a + a // 2
    assert hlo_traffic.traffic_bytes(HLO) == 12 * body + convert
    # XLA's cost analysis would count the body once; here the loop counts 12 times
    assert hlo_traffic.traffic_bytes(HLO.replace('"n":"12"', '"n":"1"')) == body + convert


def _plan_cli(*argv: str) -> list[dict]:
    """`python -m neco_jax.plan --config=tests/smallest_config.py ... --json`, run in this process: its results."""
    out, level = io.StringIO(), logging.getLogger("neco_jax").level
    try:
        with contextlib.redirect_stdout(out):
            assert run_program("neco_jax.plan", f"--config={SMALLEST}", *argv, "--json") == 0
    finally:
        logging.getLogger("neco_jax").setLevel(level)  # the program quiets the package's logger
    return json.loads(out.getvalue())["results"]


@pytest.fixture(scope="module")
def plans():
    """The demo recipe's step at its smallest shapes through the CLI, compiled once per target and shared by every
    test below (the GPU plan alone took 44 s at the demo's own shapes, 36 s at these, on 2 cores): for an
    H100 in bfloat16 (cuDNN attention), and for a TPU v5e-4 in float32 with an evaluation job's feature forward
    (voc_linear at 28 px, batch 6, bfloat16)."""
    (gpu,) = _plan_cli("--target=h100-80gb", "--config.model.dtype=bfloat16")
    tpu, features = _plan_cli(
        "--target=tpu-v5e-4",
        f"--features={CONFIGS}/eval/voc_linear.py",
        "--features.image_size=28",
        "--features.batch_size=6",
        "--features.dtype=bfloat16",
    )
    return gpu, tpu, features


@pytest.mark.slow
def test_step_compiles_for_a_gpu_and_a_tpu(plans):
    gpu, tpu, _ = plans
    assert gpu["device_kind"] == "NVIDIA H100 80GB HBM3" and gpu["attention"] == "cudnn"
    assert gpu["dtype"] == "bfloat16" and tpu["dtype"] == "float32"
    assert tpu["device_kind"].startswith("TPU v5") and tpu["devices"] == 4 and tpu["attention"] == "chunked"
    for plan in (gpu, tpu):
        mem = plan["memory"]
        assert plan["job"] == "training step" and plan["batch_size"] == smallest_config.get_config().optim.batch_size
        assert plan["fits"] and plan["remat_chosen"] == "none" and [t["remat"] for t in plan["tried"]] == ["none"]
        assert mem["peak"] == mem["arguments"] + mem["outputs"] + mem["temporaries"] - mem["aliased"] > 0
        assert mem["aliased"] > 0  # the state is donated
        assert plan["limit_bytes"] == int(plan["memory_share"] * plan["device_memory_bytes"])
        assert plan["matmul_flops"] > 0 and plan["hlo_traffic_bytes"] > 0
    assert gpu["memory_share"] == 0.75 and gpu["xla_estimated_seconds"] is None
    assert tpu["memory_share"] == 1.0 and tpu["xla_flops"] > 0  # libtpu estimates no time for it (gives -3 s)


@pytest.mark.slow
def test_describe_says_fits_and_not_autotuned(plans):
    from neco_jax.plan.report import describe

    text = describe(plans[0])
    assert text.startswith("h100-80gb: 1 x NVIDIA H100 80GB HBM3") and "FITS with model.remat=none" in text


@pytest.mark.slow
def test_feature_forward_of_an_evaluation_job_compiles_for_a_tpu(plans):
    """--features: the evaluation's own feature forward (neco_jax.models.feature_forward, which evaluation.features
    jits) on the recipe's teacher backbone, at the job's image size, batch (padded to the devices) and dtype."""
    plan = plans[2]
    assert plan["job"] == "feature forward" and plan["target"] == "tpu-v5e-4" and plan["dtype"] == "bfloat16"
    assert plan["image_size"] == 28 and plan["batch_size"] == 8 and plan["images_per_device"] == 2
    assert plan["fits"] and plan["memory"]["peak"] > 0 and plan["matmul_flops"] > 0


def test_cli_bad_target_is_one_line(capsys):
    assert run_program("neco_jax.plan", f"--config={CONFIGS}/demo.py", "--target=h200") == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "unknown target 'h200'" in err
