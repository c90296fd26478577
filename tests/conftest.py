"""Test-wide setup: four simulated CPU devices (set before JAX is imported) and the GPU marker."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    if any(d.platform == "gpu" for d in jax.devices()):
        return
    skip = pytest.mark.skip(reason="needs a GPU (run bench/gpu_check.sh on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Tests build many models of the same shapes (every recipe at reduced size, the demo, resume runs); a
# persistent compilation cache for the session lets XLA compile each distinct program once.
jax.config.update("jax_compilation_cache_dir", os.environ.get("NECO_TEST_JAX_CACHE", "/tmp/neco_jax_test_xla_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
