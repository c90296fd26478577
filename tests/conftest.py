"""Test-wide setup: four simulated CPU devices, one XLA compilation cache for the whole session, a garbage
collector that runs less often, and the GPU marker.

Both the devices and the cache are set in the environment before JAX is imported, so that the processes the
tests start (main.py, the multi-process workers, the bench scripts, the evaluation CLI) inherit them: the
demo's train step compiled here is not compiled again by `main.py --config=configs/demo.py`, nor the workers'
programs by every test that starts them. The cache is a fresh folder for each session (removed at its end),
so the suite's time is what a clean clone sees; NECO_TEST_JAX_CACHE names a folder to keep between sessions.
"""

import glob
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
# No accelerator here: JAX stays on the CPU. (The test extra installs the planning extra, whose CUDA plugin and
# libtpu would otherwise try to start devices in every process and print their failure.)
if not glob.glob("/dev/nvidia[0-9]*") and not glob.glob("/dev/accel[0-9]*") and not os.path.isdir("/dev/vfio"):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
_OWN_CACHE = "NECO_TEST_JAX_CACHE" not in os.environ
if _OWN_CACHE:
    os.environ["NECO_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="neco_jax_test_xla_cache_")
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["NECO_TEST_JAX_CACHE"]
# Every program, however quick to compile: the tests build the same small ones over and over.
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import jax  # noqa: E402  (after the environment above)
import pytest  # noqa: E402

from neco_jax import program  # noqa: E402

program.collect_garbage_less_often()  # as the programs the tests start

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    # The slow tests first (in their own order, so module fixtures are still built once): the two xdist workers
    # start on the long ones and end on short ones, instead of one worker finishing a long test alone.
    items.sort(key=lambda item: "slow" not in item.keywords)
    if any(d.platform == "gpu" for d in jax.devices()):
        return
    skip = pytest.mark.skip(reason="needs a GPU (run bench/gpu_check.sh on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    """Figures tests measure but do not assert (timings on a shared machine), one line each at the end of the run:
    a test records them with `record_property("measured: <what (unit)>", value)` (xdist carries them over)."""
    lines = [
        f"{report.nodeid}: {name.removeprefix('measured: ')} = {value}"
        for reports in terminalreporter.stats.values()
        for report in reports
        if getattr(report, "when", None) == "call"
        for name, value in getattr(report, "user_properties", ())
        if name.startswith("measured: ")
    ]
    if lines:
        terminalreporter.section("measured, not asserted")
        for line in lines:
            terminalreporter.write_line(line)


def pytest_unconfigure(config):
    if _OWN_CACHE:  # only in the process that made it (pytest-xdist's workers inherit the variable)
        shutil.rmtree(os.environ["NECO_TEST_JAX_CACHE"], ignore_errors=True)
