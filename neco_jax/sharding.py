"""Data parallelism with `jax.jit` over a 1-D device mesh: batch split on "data", everything else replicated.

Several processes (started as `neco_jax.distributed` describes): the mesh spans the devices of all of them,
each process reads only its own rows of every global batch (`input_pipeline.make_train_loader` picks them by
process index) and `global_batch` assembles the global array from the per-process pieces without any copy
between hosts.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from neco_jax.errors import ConfigError

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over `devices` (default: every device of every process) with the axis "data"."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the devices, other axes whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    n = mesh.devices.size
    if global_batch_size % n or global_batch_size % jax.process_count():
        raise ConfigError(
            f"optim.batch_size={global_batch_size} is not divisible by the {n} devices "
            f"({jax.process_count()} processes); choose a multiple of {n}"
        )


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of a batch -> global arrays sharded along "data" (one process: a plain put)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
