#!/usr/bin/env bash
# The README's test command: make .venv, install neco-jax with its test extra (torch pinned by constraints.txt)
# and the DINOv2 reference code without its stale pins, lint and format-check with ruff (configured in
# pyproject.toml), run the suite on two pytest-xdist workers (compilation is single-threaded: two workers keep
# both cores of a CI machine busy; tests/conftest.py gives them one compilation cache, and tests that compile the
# same step run on one worker, tests/train_fixtures.py) and list its 15 slowest tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
# uv lays out the ~6 GB test environment (torch's CUDA build) in about 20 s where pip takes about 2 minutes;
# pip does the same install where uv cannot.
install() {
    { .venv/bin/pip install -q uv && .venv/bin/uv pip install -q --python .venv/bin/python "$@"; } ||
        .venv/bin/pip install -q "$@"
}
install -c constraints.txt -e ".[test]"
install --no-deps dinov2==0.0.1.dev2
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# Python may keep the bytecode it compiles: an image that sets PYTHONDONTWRITEBYTECODE (this one does) makes each of
# the suite's Python processes compile jax, torch and the rest from source again (3-4 s each, 35 processes).
unset PYTHONDONTWRITEBYTECODE
# glibc's malloc asks for transparent huge pages (where the kernel gives them on request): each jitted step's
# temporaries, fresh memory every call, then fault in 2 MB at a time instead of 4 KB (the demo's 40 steps: 44 -> 39 s).
export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1"
.venv/bin/python -m pytest -n 2 --dist loadgroup --durations=15 "$@"
