"""Several processes on JAX's distributed runtime, for real: 2 processes x 2 CPU devices (gloo collectives,
coordinator on 127.0.0.1) against 1 process x 4 devices, on the same global batches.

Checked: equal per-step losses and exported weights; each process loads only its own rows of every global
batch; checkpoints written by 2 processes resume on 1 and the other way round, as if never interrupted;
SIGTERM to one process stops both at the same step with one checkpoint and the same exit status; one-line
start-up errors (unreachable coordinator, different configs). The 1-process runs are in this process (the
4 devices of conftest.py), the 2-process runs are `tests/multiprocess_worker.py` (= main.py) subprocesses.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import smallest_config

from neco_jax import train as train_lib
from neco_jax.metrics_writer import read_metrics

# One worker runs them all: the reference run is made once, and each program is compiled once, then served by the
# compilation cache (the 1-process runs share the reference's, the 2-process launches each other's).
pytestmark = pytest.mark.xdist_group("multiprocess")
ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILE = "tests/smallest_config.py"
# 2 processes vs 1, relative: the worst measured (the pre-empted run stops at step 2 on a 2-core machine; other
# stops gave the smaller figures in brackets), and the bounds, 3x or less.
LOSS_RTOL = 6.5e-7  # per-step losses: 2.2e-7
EXPORT_RTOL = 3.6e-7  # exported weights: 7.1e-8 (1.2e-7)
STATE_RTOL = 1e-6  # resumed train state: 4.2e-7 (2.3e-7)
MOMENTS_RTOL = 1e-5  # Adam's moments: 4.1e-6 (1.9e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _jax_variables(i: int, n: int, port: int) -> dict:
    return {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(n), "JAX_PROCESS_ID": str(i)}


def _slurm_variables(i: int, n: int, port: int) -> dict:
    """What `srun` sets for task i of n on one node (JAX_COORDINATOR_PORT instead of SLURM's job-id port)."""
    return {
        "SLURM_JOB_ID": "1",
        "SLURM_STEP_NODELIST": "127.0.0.1",
        "SLURM_NTASKS": str(n),
        "SLURM_PROCID": str(i),
        "SLURM_LOCALID": str(i),
        "JAX_COORDINATOR_PORT": str(port),
    }


def _launch(workdir: Path, n: int = 2, *, flags=(), per_process_flags=None, env=None, launcher=_jax_variables):
    """Start `n` worker processes (2 CPU devices each) of one run; returns the Popen objects."""
    port = _free_port()
    launch = {
        "JAX_COMPILATION_CACHE_DIR",  # tests/multiprocess_worker.py says why the workers have none
        "JAX_COORDINATOR_ADDRESS",
        "JAX_NUM_PROCESSES",
        "JAX_PROCESS_ID",
        "JAX_COORDINATOR_PORT",
        "JAX_LOCAL_DEVICE_IDS",
    }
    base = {k: v for k, v in os.environ.items() if k not in launch and not k.startswith(("SLURM_", "OMPI_"))}
    procs = []
    for i in range(n):
        e = {
            **base,
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            **launcher(i, n, port),
            "NECO_TEST_INDEX_LOG": str(workdir) + f".indices{i}.jsonl",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        cmd = [
            sys.executable,
            "tests/multiprocess_worker.py",
            f"--config={CONFIG_FILE}",
            f"--workdir={workdir}",
            *flags,
            *((per_process_flags or {}).get(i, ())),
        ]
        log = open(str(workdir) + f".log{i}", "w")  # a pipe could fill up and stall the process
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=log, stderr=subprocess.STDOUT))
        procs[-1].log = log
    return procs


def _finish(procs, timeout=300):
    """[(returncode, output)] of every process; none is left running."""
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            p.log.close()
    return [(p.returncode, Path(p.log.name).read_text()) for p in procs]


def _losses(workdir):
    return {r["step"]: r["loss_last"] for r in read_metrics(workdir)}


def _rel(a, b) -> float:
    """max |a - b| / max |b| over all leaves of two pytrees together (README's relative error).

    Per tensor it would not be meaningful: e.g. the attention key bias has a gradient of exactly zero (softmax
    ignores it), so Adam turns float32 reduction-order noise there into updates of size lr in any topology."""
    fa = jax.tree_util.tree_flatten_with_path(jax.device_get(a))[0]
    fb = jax.tree_util.tree_flatten_with_path(jax.device_get(b))[0]
    assert [p for p, _ in fa] == [p for p, _ in fb]
    diff = max(
        (float(np.max(np.abs(np.asarray(x, np.float64) - y))) for (_, x), (_, y) in zip(fa, fb) if x.size), default=0.0
    )
    scale = max((float(np.max(np.abs(np.asarray(y, np.float64)))) for _, y in fb if y.size), default=0.0)
    return diff / max(scale, 1e-30)


def _export(workdir):
    import torch

    return {
        part: {k: v.numpy() for k, v in torch.load(workdir / "export" / f"{part}_dinov2.pth").items()}
        for part in ("student", "teacher")
    }


def _saved_steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run on 1 process x 4 devices: workdir, final state, and the global batches' indices."""
    from input_pipeline import make_train_loader
    from neco_jax.settings import from_config

    c = smallest_config.get_config()
    workdir = tmp_path_factory.mktemp("mp") / "reference"
    state = train_lib.train_and_evaluate(c, workdir)["state"]
    s = from_config(c)
    loader = make_train_loader(s.views, s.loader, batch_size=c.optim.batch_size, seed=c.seed, process=(0, 1))
    indices = [next(loader)["index"].tolist() for _ in range(c.optim.total_steps)]
    loader.close()
    return workdir, jax.device_get(state), indices


def _assert_own_rows(workdir, indices, steps):
    """Process p loaded exactly rows [p*B, (p+1)*B) of each global batch of `steps` (0-based batch numbers)."""
    for p in range(2):
        lines = [json.loads(s) for s in Path(str(workdir) + f".indices{p}.jsonl").read_text().splitlines()]
        loaded = {r["batch"]: r["index"] for r in lines}
        for n in steps:
            assert loaded[n] == indices[n][2 * p : 2 * p + 2], (p, n, loaded[n], indices[n])


def _assert_same_losses(workdir, ref_dir, steps):
    a, b = _losses(ref_dir), _losses(workdir)
    print(f"losses: largest relative difference {max(abs(a[s] - b[s]) / abs(a[s]) for s in steps):.2e}")
    for s in steps:
        assert abs(a[s] - b[s]) <= LOSS_RTOL * abs(a[s]), (s, a[s], b[s])
    return [b[s] for s in steps]


@pytest.mark.slow
def test_preempted_on_two_processes_resumes_on_one(reference, tmp_path, monkeypatch):
    """2 processes from scratch, SIGTERM to process 1 only: both stop at the same step, with one checkpoint
    of it and the same exit status, after the same losses as 1 process; the run then resumes on 1 process
    and ends exactly where the uninterrupted run ends."""
    ref_dir, ref_state, indices = reference
    workdir = tmp_path / "preempted"
    procs = _launch(workdir, env={"NECO_TEST_STEP_DELAY": "1.0"})
    try:
        deadline = time.time() + 300
        while (
            time.time() < deadline
            and procs[1].poll() is None
            and not ((workdir / "metrics.jsonl").is_file() and read_metrics(workdir))
        ):
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGTERM)
    finally:
        results = _finish(procs)
    codes = [rc for rc, _ in results]
    stopped = [re.findall(r"checkpoint of step (\d+) saved, stopping", err) for _, err in results]
    assert stopped[0] and stopped[0] == stopped[1], [err[-2000:] for _, err in results]
    step = int(stopped[0][0])
    assert 2 <= step < 6 and codes == [128 + signal.SIGTERM] * 2, (step, codes)  # main.py: stopped, resumable
    assert _saved_steps(workdir) == [step]
    # the loader's position, and its counts summed over both processes (2 images per process and step)
    data_state = json.loads((workdir / "checkpoints" / str(step) / "data" / "metadata").read_text())
    assert data_state == {"next_batch": step, "bad_files": 0, "files_read": 4 * step}, data_state
    losses = _assert_same_losses(workdir, ref_dir, range(1, step + 1))
    _assert_own_rows(workdir, indices, range(step))

    real, inits = train_lib.random_params, []

    def spy(*args, **kwargs):  # the resume may build the state's shapes, never its values
        out = real(*args, **kwargs)
        inits.append(all(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(out)))
        return out

    monkeypatch.setattr(train_lib, "random_params", spy)
    out = train_lib.train_and_evaluate(smallest_config.get_config(), workdir)
    assert out["step"] == 6 and inits == [True]
    errs = {
        k: _rel(getattr(out["state"], k), getattr(ref_state, k)) for k in ("student", "teacher", "queue", "rng", "step")
    }
    # Adam's moments are the gradients themselves, summed over the devices in another order on 2 processes:
    # float32 reduction noise (up to 4e-6 of the largest moment here), which the parameters above do not show.
    opt_err = _rel(out["state"].opt_state, ref_state.opt_state)
    print(
        f"2 processes: losses {losses}, stopped at step {step}; resumed on 1: relative state differences {errs}, "
        f"optimizer moments {opt_err:.3g}"
    )
    assert max(errs.values()) <= STATE_RTOL and opt_err <= MOMENTS_RTOL, (errs, opt_err)
    _assert_same_losses(workdir, ref_dir, range(step + 1, 7))


@pytest.mark.slow
def test_two_processes_continue_a_one_process_run(reference, tmp_path):
    """1 process saves step 2; 2 processes resume it and finish: the same losses and exported weights as the
    uninterrupted 1-process run, each process reading only its rows, process 0 alone writing files."""
    ref_dir, ref_state, indices = reference
    workdir = tmp_path / "grown"
    first = train_lib.train_and_evaluate(smallest_config.get_config(), workdir, stop_after=2)
    assert first["step"] == 2 and _saved_steps(workdir) == [2]
    results = _finish(_launch(workdir))
    assert [rc for rc, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    losses = _assert_same_losses(workdir, ref_dir, range(3, 7))
    ref_export, export = _export(ref_dir), _export(workdir)
    err = max(_rel(export[p], ref_export[p]) for p in ref_export)
    print(f"2 processes from step 2: losses {losses}, max relative difference of the exports {err:.3g}")
    assert err <= EXPORT_RTOL
    _assert_own_rows(workdir, indices, range(2, 6))
    for _, log in results:  # both log their progress; the metrics rows are process 0's alone
        assert "resumed from" in log and "step 6/6" in log
    assert [r["step"] for r in read_metrics(workdir)] == list(range(1, 7))


def _start_alone(workdir, port, process_id):
    """main.py as process `process_id` of 2, alone: (exit status, its one error line, stderr)."""
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_NUM_PROCESSES": "2",
        "JAX_PROCESS_ID": str(process_id),
    }
    done = subprocess.run(
        [sys.executable, "main.py", f"--config={CONFIG_FILE}", f"--workdir={workdir}", "--config.init_timeout_s=2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert not workdir.exists()
    return done.returncode, errors[0]


def test_unreachable_coordinator_is_one_line(tmp_path):
    port = _free_port()  # nothing listens there
    rc, error = _start_alone(tmp_path / "w", port, 1)
    assert rc == 2
    for part in (f"127.0.0.1:{port}", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES=2", "JAX_PROCESS_ID=1", "2 s"):
        assert part in error, error


def test_coordinator_port_taken_is_one_line(tmp_path):
    with socket.socket() as taken:  # process 0 must listen on every address at this port
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc, error = _start_alone(tmp_path / "w", port, 0)
    assert rc == 2 and f"JAX_COORDINATOR_ADDRESS=127.0.0.1:{port}" in error, error


def test_processes_with_different_configs_refuse_to_start(tmp_path):
    """Started as srun starts them (JAX's SLURM detection joins them), with one flag that differs: both stop after
    their error line, at once (they took 6-12 s in all here; JAX's shutdown barrier once held them 156 s longer,
    which the 120 s limit fails)."""
    results = _finish(
        _launch(tmp_path / "w", per_process_flags={1: ["--config.optim.lr_heads=0.002"]}, launcher=_slurm_variables),
        timeout=120,
    )
    for rc, err in results:
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
        assert "process(es) [1] resolved a config or --workdir different from process 0's" in errors[0]
    assert not (tmp_path / "w" / "config.json").exists()


def test_loader_counts_are_split_over_any_number_of_processes(monkeypatch):
    """A checkpoint holds the loader's counts summed over its processes; resumed on N processes each takes a
    share, and the shares add up to the saved totals again (so a later checkpoint counts every file once)."""
    from neco_jax import distributed

    class Loader:
        def set_state(self, state):
            self.state = state

    saved = {"next_batch": 7, "bad_files": 5, "files_read": 1001}
    for n in (1, 2, 3, 4):
        shares = []
        for p in range(n):
            monkeypatch.setattr(jax, "process_count", lambda n=n: n)
            monkeypatch.setattr(jax, "process_index", lambda p=p: p)
            loader = Loader()
            distributed.set_loader_state(loader, saved)
            shares.append(loader.state)
        assert all(s["next_batch"] == 7 for s in shares)
        assert sum(s["bad_files"] for s in shares) == 5 and sum(s["files_read"] for s in shares) == 1001
        assert max(s["files_read"] for s in shares) - min(s["files_read"] for s in shares) <= 1
