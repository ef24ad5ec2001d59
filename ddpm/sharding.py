"""Device mesh and shardings for data-parallel training and sampling.

The mesh has one axis, `data`: batches are split along it, parameters are replicated. Arrays
are placed with `NamedSharding`s and `jax.jit` propagates them; there is no pmap.
"""

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def create_mesh(devices: list | None = None) -> Mesh:
    """A 1-D `data` mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh((len(devices),), (DATA_AXIS,), (AxisType.Auto,), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer state, scalars)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis is split over the `data` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def per_device_batch_size(global_batch_size: int, mesh: Mesh, field: str) -> int:
    """global / devices, or a ValueError naming `field` when it does not divide."""
    devices = mesh.devices.size
    if global_batch_size < 1 or global_batch_size % devices:
        raise ValueError(
            f"{field}={global_batch_size} must be a positive multiple of the device count "
            f"({devices} devices); e.g. {field}={max(1, global_batch_size // devices) * devices}"
        )
    return global_batch_size // devices


def per_process_batch_size(global_batch_size: int) -> int:
    """The slice of the global batch that this process loads."""
    return global_batch_size // jax.process_count()


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles the process-local slices of every process into globally sharded arrays."""
    sharding = batch_sharded(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }
