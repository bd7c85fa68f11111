"""Multi-host plumbing: ``jax.distributed`` start-up, each host's rows of the global batch, global arrays.

On a TPU pod (or under SLURM / Open MPI) ``jax.distributed.initialize()`` finds its peers by itself
(``--distributed=auto``); elsewhere the coordinator address, the number of processes and this process's id come from
flags or from the environment (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``).

Every host feeds only its slice of the global batch. Which rows those are follows from the batch sharding over the
mesh (``host_batch_rows``), and ``jax.make_array_from_process_local_data`` stitches the hosts' slices into one
global array per batch key.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False, cpu_collectives: str = "gloo") -> bool:
    """Start ``jax.distributed`` if this run is multi-process; returns whether it did.

    Explicit arguments win over the environment. ``auto=True`` lets JAX detect the cluster (TPU pods, SLURM).
    On CPU, cross-process collectives need an implementation (``gloo``), which must be chosen before start-up.
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
        num_processes = int(os.environ[ENV_NUM_PROCESSES])
    if process_id is None and os.environ.get(ENV_PROCESS_ID):
        process_id = int(os.environ[ENV_PROCESS_ID])
    if not auto and coordinator_address is None:
        if num_processes not in (None, 1):
            raise ValueError(f"distributed: {num_processes} processes requested but no coordinator address "
                             f"(--coordinator_address or ${ENV_COORDINATOR})")
        return False
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if auto and coordinator_address is None:
        jax.distributed.initialize()
        return True
    if num_processes is None or process_id is None:
        raise ValueError(f"distributed: coordinator '{coordinator_address}' given, but num_processes "
                         f"({num_processes}) and process_id ({process_id}) are both needed")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"distributed: process_id {process_id} is outside [0, {num_processes})")
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
    return True


def batch_sharding(mesh, ndim: int, rules=None) -> NamedSharding:
    """The sharding of a batch array: first axis over the mesh axes the rules give ``"batch"`` (data, fsdp)."""
    from jaxvc.parallel.rules import DEFAULT_RULES

    target = dict(rules or DEFAULT_RULES).get("batch")
    names = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    names = tuple(n for n in names if mesh.shape.get(n, 1) > 1)
    first = None if not names else (names[0] if len(names) == 1 else names)
    return NamedSharding(mesh, PartitionSpec(first, *([None] * (ndim - 1))))


def batch_axis_size(mesh, rules=None) -> int:
    """How many ways the batch axis is split."""
    spec = batch_sharding(mesh, 1, rules).spec[0]
    names = () if spec is None else ((spec,) if isinstance(spec, str) else tuple(spec))
    return int(np.prod([mesh.shape[n] for n in names])) if names else 1


def host_batch_rows(sharding: NamedSharding, global_batch_size: int) -> tuple[int, int]:
    """``[start, stop)``: the rows of the global batch this process's devices hold (must be contiguous)."""
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map((global_batch_size,)).values():
        rows.update(range(*index[0].indices(global_batch_size)))
    start, stop = min(rows), max(rows) + 1
    if len(rows) != stop - start:
        raise ValueError(f"this process's devices hold non-contiguous batch rows {sorted(rows)}; order the "
                         f"mesh's devices by process")
    return start, stop


def global_batch(local_batch: Mapping[str, Any], mesh, global_batch_size: int, rules=None) -> dict[str, jax.Array]:
    """Host-local numpy arrays (this process's rows) -> global ``jax.Array``s sharded over the batch axis.

    Entries that cannot enter a jitted step are left on the host: strings (captions, kinds) and per-batch scalars
    (``batch_index``, ``num_skipped``) are bookkeeping of the data pipeline, not model inputs.
    """
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        if value.ndim == 0 or value.dtype.kind in "USO":
            continue
        sharding = batch_sharding(mesh, value.ndim, rules)
        start, stop = host_batch_rows(sharding, global_batch_size)
        if value.shape[0] != stop - start:
            raise ValueError(f"batch['{key}'] has {value.shape[0]} rows on process {jax.process_index()}, "
                             f"expected {stop - start} (rows [{start}, {stop}) of the global batch of "
                             f"{global_batch_size})")
        out[key] = jax.make_array_from_process_local_data(sharding, value, (global_batch_size, *value.shape[1:]))
    return out


def any_process(flag: bool) -> bool:
    """True on every process if ``flag`` is true on any (a no-op on one process)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.asarray(multihost_utils.process_allgather(np.asarray([bool(flag)], np.int32))).any())


def to_host(tree):
    """Fully replicated numpy copies of (possibly multi-host sharded) arrays, on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)
