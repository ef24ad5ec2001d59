"""Device mesh, shardings and the multi-host runtime.

The mesh has two axes, `("data", "fsdp")`. Batches are split over both. Parameters, their
EMA and the optimizer state are split over `fsdp` by `fsdp_spec` (ZeRO-3 / FSDP style: each
large array is cut along one axis and gathered by XLA where a layer needs it) and replicated
over `data`; with `fsdp = 1` everything is replicated, which is plain data parallelism.
Arrays are placed with `NamedSharding`s and `jax.jit` propagates them; there is no pmap.
"""

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ddpm.errors import UserError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Joins this process to a multi-process JAX job; call before any other JAX call.

    Arguments left None are filled in by `jax.distributed.initialize` itself: from the
    environment (JAX_COORDINATOR_ADDRESS, ...) or by detecting a TPU pod, SLURM or Open MPI.
    CPU collectives go through gloo, so the same code runs as several processes on one CPU
    machine (how the tests run it); GPUs and TPUs use their own collectives.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )


def create_mesh(devices: list | None = None, *, fsdp: int = 1) -> Mesh:
    """A `(data, fsdp)` mesh over `devices` (default: every device of every process).

    fsdp: devices that share (split) each parameter; must divide the device count.
    """
    devices = jax.devices() if devices is None else devices
    if fsdp < 1 or len(devices) % fsdp:
        raise UserError(
            f"config.training.fsdp={fsdp} must be a positive divisor of the device count "
            f"({len(devices)} devices)"
        )
    return jax.make_mesh(
        (len(devices) // fsdp, fsdp),
        (DATA_AXIS, FSDP_AXIS),
        (AxisType.Auto, AxisType.Auto),
        devices=devices,
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (scalars, metrics, small parameters)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis is split over all devices (`data` and `fsdp` axes)."""
    return NamedSharding(mesh, PartitionSpec((DATA_AXIS, FSDP_AXIS)))


def sample_sharding(mesh: Mesh, batch_size: int) -> NamedSharding:
    """A sampler's layout of `batch_size` samples: split like a training batch when the device
    count divides it, otherwise replicated (every device draws the whole batch)."""
    return batch_sharded(mesh) if batch_size % mesh.devices.size == 0 else replicated(mesh)


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> PartitionSpec:
    """How one parameter-shaped array is split over the `fsdp` axis.

    Arrays with fewer than `min_size` elements, and those with no axis divisible by `fsdp`,
    are replicated; others are split along their largest divisible axis (the last of equals,
    e.g. a conv kernel's output channels).
    """
    if fsdp == 1 or math.prod(shape) < min_size:
        return PartitionSpec()
    divisible = [i for i, n in enumerate(shape) if n % fsdp == 0]
    if not divisible:
        return PartitionSpec()
    axis = max(divisible, key=lambda i: (shape[i], i))
    return PartitionSpec(*(FSDP_AXIS if i == axis else None for i in range(len(shape))))


def state_shardings(tree: Any, mesh: Mesh, min_size: int) -> Any:
    """A `NamedSharding` per leaf of `tree` (arrays or `jax.ShapeDtypeStruct`s) by `fsdp_spec`.

    Optimizer moments have their parameters' shapes, so they get the same split.
    """
    fsdp = mesh.shape[FSDP_AXIS]
    return jax.tree.map(
        lambda leaf: NamedSharding(mesh, fsdp_spec(tuple(leaf.shape), fsdp, min_size)), tree
    )


def to_host(x: jax.Array, mesh: Mesh) -> np.ndarray:
    """A NumPy copy of `x` on every process, even when its shards live on other processes.

    Such an array (e.g. sampler output computed from parameters split over hosts) is first
    replicated by a jitted identity; arrays this process holds whole are copied directly.
    """
    if not x.is_fully_addressable and not x.is_fully_replicated:
        x = jax.jit(lambda a: a, out_shardings=replicated(mesh))(x)
    return np.asarray(x)


def per_device_batch_size(global_batch_size: int, mesh: Mesh, field: str) -> int:
    """global / devices, or a UserError naming `field` when it does not divide."""
    devices = mesh.devices.size
    if global_batch_size < 1 or global_batch_size % devices:
        raise UserError(
            f"{field}={global_batch_size} must be a positive multiple of the device count "
            f"({devices} devices); e.g. {field}={max(1, global_batch_size // devices) * devices}"
        )
    return global_batch_size // devices


def per_process_batch_size(global_batch_size: int) -> int:
    """The slice of the global batch that this process loads."""
    return global_batch_size // jax.process_count()


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles the process-local slices of every process into globally sharded arrays.

    local_batch: this process's rows, [global / process_count, ...] each. On a mesh that
    orders devices by process (`create_mesh` on CPU and GPU), process p's rows are block p of
    the global batch.
    """
    sharding = batch_sharded(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }
