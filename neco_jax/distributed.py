"""Several processes on JAX's multi-controller runtime (`jax.distributed`): start-up, agreement, host copies.

Every process runs the same command. They find each other through
  JAX_COORDINATOR_ADDRESS=host0:port JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i   (set for every process)
or, when JAX_COORDINATOR_ADDRESS is unset, through the variables of SLURM (`srun`) or Open MPI (`mpirun`),
which JAX's cluster detection reads. A process alone needs none of them. CPU processes run their
collectives over gloo (JAX's `jax_cpu_collectives_implementation`); GPUs use NCCL.

What the processes must agree on is exchanged here, always at the same step on every process (a collective
that one process skips leaves the others waiting forever): the resolved config at start, a stop request
(SIGTERM) that reached any one of them, and the data loader's running counts at each checkpoint.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import socket
import threading
from typing import Any

import jax
import numpy as np
from jax._src import distributed as jax_distributed  # the coordinator's key-value store has no public handle
from jax.experimental import multihost_utils

from neco_jax.errors import DistributedError, print_error

log = logging.getLogger(__name__)

ADDRESS, NUM_PROCESSES, PROCESS_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def _launched_by_cluster() -> bool:
    """Started as one of several tasks by srun or mpirun (JAX's cluster detection fills in the rest)."""
    return (int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ) or int(
        os.environ.get("OMPI_COMM_WORLD_SIZE", "1")
    ) > 1


def _explicit_launch() -> tuple[str, int, int] | None:
    """(address, process count, process id) from the JAX_* variables; None when JAX_COORDINATOR_ADDRESS is unset."""
    address = os.environ.get(ADDRESS)
    if not address:
        return None
    try:
        num, pid = int(os.environ[NUM_PROCESSES]), int(os.environ[PROCESS_ID])
    except (KeyError, ValueError):
        raise DistributedError(
            f"{ADDRESS}={address} is set, so {NUM_PROCESSES} (the number of processes) and {PROCESS_ID} (0.."
            f"N-1) must be integers, got {NUM_PROCESSES}={os.environ.get(NUM_PROCESSES)!r} "
            f"{PROCESS_ID}={os.environ.get(PROCESS_ID)!r}; set both for every process"
        ) from None
    if ":" not in address or not 0 <= pid < num:
        raise DistributedError(
            f"{ADDRESS}={address} must be host:port and {PROCESS_ID}={pid} must lie in 0..{NUM_PROCESSES}-1={num - 1}"
        )
    return address, num, pid


def initialize(timeout_s: int) -> None:
    """`jax.distributed.initialize` when launched as one of several processes; a no-op for one process.

    Must run before anything touches a JAX device. If not every process has reached the coordinator
    within `timeout_s` (config.init_timeout_s), stop with one line naming the address and the variables (JAX
    itself would abort the process with a C++ stack trace; a watchdog thread exits first, with status 2).
    """
    explicit = _explicit_launch()
    if jax.distributed.is_initialized() or (explicit is None and not _launched_by_cluster()):
        return
    if explicit is not None and explicit[1] == 1:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # SIGTERM is the training loop's to handle (stop at an agreed step, see `agreed_stop`). JAX's preemption
    # service would catch it in C++ from here on and, before the loop's handler is installed, swallow it.
    jax.config.update("jax_enable_preemption_service", False)
    if explicit is None:
        where = (
            "the address JAX derived from the SLURM / Open MPI variables (start every task with srun / mpirun, "
            f"or set {ADDRESS})"
        )
        kwargs = {}
    else:
        address, num, pid = explicit
        where = f"{ADDRESS}={address} ({NUM_PROCESSES}={num}, {PROCESS_ID}={pid})"
        kwargs = {"coordinator_address": address, "num_processes": num, "process_id": pid}

    def give_up():  # runs on a timer thread, where raising would not end the process
        status = print_error(
            f"the processes did not all reach the coordinator at {where} within {timeout_s} s "
            "(config.init_timeout_s): start every process with the same address (host:port of process 0, "
            f"reachable from every host) and {NUM_PROCESSES}, and distinct {PROCESS_ID}s 0..N-1"
        )
        os._exit(status)

    if explicit is not None and explicit[2] == 0:
        _check_port_free(explicit[0], where)
    watchdog = threading.Timer(timeout_s, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:  # JAX's own deadline is later than the watchdog's, so that the one-line message wins
        jax.distributed.initialize(initialization_timeout=timeout_s + 60, **kwargs)
    except (RuntimeError, ValueError) as err:  # e.g. process 0 cannot listen on the port
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DistributedError(f"jax.distributed could not start with {where}: {first}") from None
    finally:
        watchdog.cancel()
    log.info(
        "process %d of %d: %d local devices of %d",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def _check_port_free(address: str, where: str) -> None:
    """Process 0's coordinator port must be free: JAX's service (listening on every address) does not raise
    when it is taken but may crash the process in C++, so probe it the same way first."""
    port = int(address.rsplit(":", 1)[1])
    family, host = (socket.AF_INET6, "::") if socket.has_ipv6 else (socket.AF_INET, "0.0.0.0")
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ports in TIME_WAIT are fine
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            probe.bind((host, port))
    except OSError as err:
        if err.errno != errno.EADDRINUSE:
            return  # e.g. no IPv6 on this host: leave the verdict to JAX
        raise DistributedError(
            f"jax.distributed could not start with {where}: port {port} is already in use on "
            "this host (another job, or an earlier run still exiting); choose a free port"
        ) from None


def _allgather(values: np.ndarray) -> np.ndarray:
    """(process_count, *values.shape): every process's `values`, on every process (a collective)."""
    return np.asarray(multihost_utils.process_allgather(values))


def check_same_config(config, workdir: str) -> None:
    """Refuse to start when the processes resolved different configs or workdirs (compared by SHA-256)."""
    if jax.process_count() == 1:
        return
    text = config.to_json_best_effort(sort_keys=True) + "\n" + os.path.normpath(workdir)
    digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
    digests = _allgather(digest)
    differ = [p for p in range(len(digests)) if not np.array_equal(digests[p], digests[0])]
    if differ:
        raise DistributedError(
            f"process(es) {differ} resolved a config or --workdir different from process 0's (this is process "
            f"{jax.process_index()}, config sha256 {digest.tobytes().hex()[:12]}); start every process with the "
            "same --config, --config.* overrides and --workdir"
        )


STOP_CHECK_TIMEOUT_MS = 10 * 60 * 1000  # a peer this late at a stop check is stuck (its collectives would hang too)


def agreed_stop(local_signal: int | None, step: int) -> int | None:
    """The signal that asked any process to stop, agreed by all at `step` (None: carry on); a collective, so
    every process calls it at the same steps (`neco_jax.periodic.StopAgreement` decides which).

    One process alone acts on its own signal at once. Several exchange their flags through the coordinator's
    key-value store (a flag under the step's key, then a barrier of the hosts), not through the devices: the
    hosts wait for each other, never for their devices' queued steps.
    """
    if jax.process_count() == 1:
        return local_signal
    client = jax_distributed.global_state.client
    if local_signal:
        client.key_value_set(f"neco_stop/{step}/{jax.process_index()}", str(int(local_signal)))
    client.wait_at_barrier(f"neco_stop_check_{step}", STOP_CHECK_TIMEOUT_MS)
    return max((int(v) for _, v in client.key_value_dir_get(f"neco_stop/{step}/")), default=0) or None


def _host(x):
    if not isinstance(x, jax.Array):
        return x
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    if x.sharding.is_fully_replicated:  # every process holds whole replicas, though not all of them
        return np.asarray(x.addressable_data(0))
    raise ValueError(f"an array sharded over several processes ({x.sharding}) has no copy on one host")


def host_copy(tree: Any) -> Any:
    """NumPy copies of the arrays of `tree` (replicated ones taken from this process's own replica)."""
    return jax.tree.map(_host, tree)


def total(*counts: int) -> tuple[int, ...]:
    """Each count summed over all processes (a collective: call it at the same step everywhere)."""
    if jax.process_count() == 1:
        return tuple(int(c) for c in counts)
    return tuple(int(c) for c in _allgather(np.asarray(counts, np.int32)).sum(axis=0))


def global_loader_state(state: dict) -> dict:
    """A loader state to checkpoint: the position (the same on every process) and the counts of all processes."""
    bad, read = total(state["bad_files"], state["files_read"])
    return {**state, "bad_files": bad, "files_read": read}


def set_loader_state(loader, state: dict) -> None:
    """Continue from a checkpointed loader state on any number of processes: each takes its share of the counts."""
    n, p = jax.process_count(), jax.process_index()
    share = {k: state[k] // n + (p < state[k] % n) for k in ("bad_files", "files_read")}
    loader.set_state({**state, **share})
