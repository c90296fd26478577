#!/usr/bin/env bash
# The README's test command: make .venv, install neco-jax with its test extra (torch pinned by
# constraints.txt), add the DINOv2 reference code without its stale pins, lint and format-check with ruff
# (configured in pyproject.toml), run the suite on two pytest-xdist workers (compilation is single-threaded:
# two workers keep both cores of a CI machine busy; tests/conftest.py gives them one compilation cache) and
# list its 15 slowest tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q -c constraints.txt -e ".[test]"
.venv/bin/pip install -q --no-deps dinov2==0.0.1.dev2
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -n 2 --dist worksteal --durations=15 "$@"
