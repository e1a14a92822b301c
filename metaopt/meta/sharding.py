"""Scale-out with ``jax.sharding``: the population axis over every device of every host.

One program for every setup: a 1-D :class:`jax.sharding.Mesh` over ``jax.devices()``
(all hosts' devices after :func:`initialize_distributed`), population leaves sharded
along their leading axis, everything else (theta, outer optimizer state, key, step)
replicated. The unrolls run under ``jax.shard_map`` (:mod:`metaopt.meta.unroll`); the
estimators' reductions over members are ordinary jitted ``mean``/``dot`` that XLA lowers
to all-reduces. No hand-written communication.

On one machine the same code path runs with fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``) or as several local processes
(``jax.distributed.initialize`` with gloo collectives on CPU).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from metaopt.meta.unroll import POP_AXIS

# Environment variables read by initialize_distributed when its arguments are None.
ENV_COORDINATOR = "METAOPT_COORDINATOR"
ENV_NUM_PROCESSES = "METAOPT_NUM_PROCESSES"
ENV_PROCESS_ID = "METAOPT_PROCESS_ID"


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """``jax.distributed.initialize`` when a multi-process run is asked for.

  Arguments default to ``$METAOPT_COORDINATOR`` (``host:port``),
  ``$METAOPT_NUM_PROCESSES`` and ``$METAOPT_PROCESS_ID``. With none of them set, nothing
  happens (one process) -- except on a TPU pod or under a cluster scheduler that JAX
  detects itself, where ``num_processes=-1`` asks for auto-detection. On CPU, the
  cross-process collectives use gloo. Returns whether JAX was initialized.
  """
  coordinator = coordinator or os.environ.get(ENV_COORDINATOR)
  if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
    num_processes = int(os.environ[ENV_NUM_PROCESSES])
  if process_id is None and os.environ.get(ENV_PROCESS_ID):
    process_id = int(os.environ[ENV_PROCESS_ID])
  if coordinator is None and num_processes is None:
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if num_processes == -1:  # auto-detect (TPU pods, SLURM, ...)
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator, num_processes, process_id)
  return True


def population_mesh(devices=None) -> Mesh:
  """A 1-D mesh named ``"pop"`` over ``devices`` (default: every device of every host)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (POP_AXIS,))


def population_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (member) axis split over the mesh."""
  return NamedSharding(mesh, P(POP_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_population_size(size: int, mesh: Mesh, what: str) -> None:
  """Raises a clear error when ``size`` members do not split evenly over the mesh."""
  n = mesh.size
  if size % n:
    raise ValueError(
        f"{what}: {size} members cannot be split evenly over {n} devices; choose pair "
        f"counts so that 2 * pairs is a multiple of {n} (or set num_blind_pairs=0).")


def abstract(tree: Any, sharding) -> Any:
  """``jax.ShapeDtypeStruct`` tree of ``tree`` (arrays or shape structs) on ``sharding``."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), tree)


def global_array(value: Any, sharding: jax.sharding.Sharding) -> jax.Array:
  """``value`` (host data, equal on every process) as one global ``jax.Array`` laid out
  by ``sharding``: each process places the slices of its own devices.

  Unlike ``jax.device_put`` of host data, this also holds in a multi-process run, where
  ``sharding`` spans devices of other processes: the result is an array of the global
  mesh, as a jitted program with ``out_shardings`` would return, which orbax can save
  shard by shard.
  """
  host = np.asarray(value)
  return jax.make_array_from_callback(host.shape, sharding,
                                      lambda index: np.asarray(host[index]))


def global_zeros(shape: tuple[int, ...], dtype, sharding: jax.sharding.Sharding
                 ) -> jax.Array:
  """Zeros as a global ``jax.Array`` on ``sharding`` (see :func:`global_array`), built
  shard by shard: no host copy of the whole array."""
  shard = sharding.shard_shape(tuple(shape))
  return jax.make_array_from_callback(tuple(shape), sharding,
                                      lambda index: np.zeros(shard, dtype))


def is_primary() -> bool:
  """Process 0 writes logs and exported artifacts."""
  return jax.process_index() == 0
