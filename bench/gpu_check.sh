#!/usr/bin/env bash
# Every GPU check in one go, for a fresh GPU machine with JAX installed and no network (about 8 minutes):
#   1. install the packages its image lacks from bench/wheels/ (filled here by `bash bench/fetch_wheels.sh`)
#      and this repo itself, all with --no-deps into a private folder;
#   2. the tests marked for the GPU (tests/test_gpu.py: fp32 parity with the CPU, bf16 sanity);
#   3. bench/train_step.py (each case in its own process, under a time budget; first each recipe's own default
#      config, float32 with model.remat and model.attention "auto", as a user runs it);
#   4. bench/forward.py; then bench/sorting.py if time is left
#      (or, with GPU_CHECK_EVAL=1, bench/evaluation.py and bench/retrieval.py instead of 3 and 4).
# Leaves gpu_check.log, tests.txt, train_step.{txt,json}, forward.{txt,json} (sorting.txt) in $OUT (the device tool's
# folder) or else bench/results/gpu/, and ends with the summary. From the session that has a GPU:
#   run(command="bash bench/gpu_check.sh", carry=["bench/wheels"], timeout_s=560)
# GPU_CHECK_BUDGET_S (default 470) is the whole script's time; PYTHON picks the interpreter (default python3);
# BENCH_ARGS=--small runs the benches at CPU sizes (a dry run of this script without a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${OUT:-bench/results/gpu}
mkdir -p "$RESULTS"
exec > >(tee -a "$RESULTS/gpu_check.log") 2>&1
T0=$SECONDS
TOTAL=${GPU_CHECK_BUDGET_S:-470}
PY=${PYTHON:-python3}
BENCH_ARGS=${BENCH_ARGS:-}
SITE=/tmp/neco_site
export PYTHONUNBUFFERED=1 BENCH_RESULTS_DIR="$RESULTS" PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# A batch-64 step at 518 px needs most of the card; JAX's default preallocation is 75%.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
left() { echo $(( TOTAL - (SECONDS - T0) )); }
stage() { echo; echo "== [$(( SECONDS - T0 )) s] $*"; }

stage "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || echo "no nvidia-smi"
git log --oneline -1 2>/dev/null || true

stage "install carried wheels and the repo (--no-deps, no index) into $SITE"
if "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  if ! ls bench/wheels/*.whl >/dev/null 2>&1; then
    echo "error: no wheels in bench/wheels; run 'bash bench/fetch_wheels.sh' on the CPU machine and carry bench/wheels"
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    bench/wheels/*.whl || { echo "error: installing the carried wheels failed"; exit 2; }
else
  echo "  the carried wheels are for CPython 3.12; $("$PY" -V) uses its own packages (a dry run)"
fi
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target "$SITE" . \
  || echo "warning: installing the repo failed; the checkout on PYTHONPATH is used instead"
"$PY" - <<'PYEOF' || { echo "error: imports failed (see above)"; exit 2; }
import importlib
for name in ("jax", "flax", "optax", "orbax.checkpoint", "ml_collections", "clu", "grain", "tensorflow_datasets"):
    mod = importlib.import_module(name)
    print(f"  {name} {getattr(mod, '__version__', '')}")
import jax
import neco_jax.train  # noqa: F401
print("  devices:", jax.devices())
PYEOF

stage "bf16 matmul ceiling (8192^3 on a GPU, jnp.dot, random data)"
"$PY" - <<'PYEOF' || echo "warning: matmul ceiling check failed"
import time
import jax, jax.numpy as jnp
n = 8192 if jax.devices()[0].platform == "gpu" else 512
a, b = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in jax.random.split(jax.random.key(0)))
f = jax.jit(jnp.dot)
f(a, b).block_until_ready()
t = time.perf_counter()
for _ in range(20):
    out = f(a, b)
out.block_until_ready()
print(f"  {2 * n**3 * 20 / (time.perf_counter() - t) / 1e12:.0f} TFLOP/s bf16 on {jax.devices()[0].device_kind}")
PYEOF

stage "GPU tests (tests/test_gpu.py, -m gpu)"
timeout 200 "$PY" -m pytest -q -m gpu tests/test_gpu.py tests/test_knn.py -p no:cacheprovider 2>&1 | tee "$RESULTS/tests.txt"
tests_rc=${PIPESTATUS[0]}

if [ "${GPU_CHECK_EVAL:-0}" = 1 ]; then
  stage "evaluation benches ($(left) s left)"
  timeout $(( $(left) / 2 )) "$PY" bench/evaluation.py $BENCH_ARGS 2>&1 | tee "$RESULTS/evaluation.txt"
  timeout $(( $(left) - 10 )) "$PY" bench/retrieval.py $BENCH_ARGS 2>&1 | tee "$RESULTS/retrieval.txt"
  ls -l "$RESULTS"
  exit "$tests_rc"
fi
stage "train step bench ($(left) s left)"
budget=$(( $(left) - 130 )); (( budget < 30 )) && budget=30
timeout $(( $(left) - 80 > 90 ? $(left) - 80 : 90 )) "$PY" bench/train_step.py --isolate --budget_s="$budget" \
  --profile s14_518_b64_bf16_auto $BENCH_ARGS 2>&1 | tee "$RESULTS/train_step.txt"

stage "forward bench ($(left) s left)"
budget=$(( $(left) - 45 )); (( budget < 10 )) && budget=10
timeout $(( $(left) > 40 ? $(left) : 40 )) "$PY" bench/forward.py --budget_s="$budget" $BENCH_ARGS 2>&1 \
  | tee "$RESULTS/forward.txt"

if (( $(left) >= 40 )); then  # extra, if time is left: the sort executors alone at NeCo's 31,360 x 49 rows
  stage "sorting bench ($(left) s left)"
  timeout $(( $(left) - 5 )) "$PY" bench/sorting.py 2>&1 | tee "$RESULTS/sorting.txt"
fi

# GPU_CHECK_EVAL=1: the evaluation benches (overclustering k-means, retrieval k-NN and memory bank) take the
# place of the train-step and forward benches, for a second device session (each takes minutes at full size).
stage "summary"
echo "tests: exit $tests_rc; $(tail -1 "$RESULTS/tests.txt")"
sed -n '/^device:/,/^wrote/p' "$RESULTS/train_step.txt"
sed -n '/^Feature extraction/,/^wrote/p' "$RESULTS/forward.txt"
[ -f "$RESULTS/sorting.txt" ] && sed -n '/^sort (/,$p' "$RESULTS/sorting.txt"
ls -l "$RESULTS"
exit "$tests_rc"
