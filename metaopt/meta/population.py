"""A population of persistent inner runs, their truncation schedule and resets.

A :class:`Population` is a pytree whose leaves all have a leading member axis of size P.
Members are grouped in antithetic pairs (member ``i`` and ``i + P/2``): the two share
their initialization, data, horizon and reset times, and differ only in the sign of the
perturbation of theta (Vicol et al, "Unbiased Gradient Estimation in Unrolled
Computation Graphs with Persistent Evolution Strategies", arXiv:2112.13835, 2021). For
TBPTT the pairing is off and every member is independent.

Episodes (one inner training run from a fresh init to its horizon) last a multiple of
the truncation length K, so resets fall on truncation boundaries. The first episode of
every pair is cut to a uniform number of truncations, staggering the resets across the
population so that every truncation sees members at all stages of training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any, Callable, Hashable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Sub-keys of an episode key (jax.random.fold_in data): what each one seeds.
INIT_STREAM, DATA_STREAM, HORIZON_STREAM = 0, 1, 2


class Population(NamedTuple):
  """P inner runs (leading axis P on every leaf).

  Attributes:
    inner: the task's inner state (parameters, optimizer state, ...).
    step: int32, inner steps done in the current episode.
    horizon: int32, the current episode's length (a multiple of K).
    normalizer: float32, the episode's initial training loss (0 before its first step).
    perturbation: float32 ``[P, dim(theta)]``, PES's accumulated perturbation of the
      current episode (zero for ES and TBPTT).
    episode_key: uint32 ``[P, 2]``, seeds the episode's init, data and horizon.
  """

  inner: Any
  step: jax.Array
  horizon: jax.Array
  normalizer: jax.Array
  perturbation: jax.Array
  episode_key: jax.Array


@dataclasses.dataclass(frozen=True)
class TruncationSchedule:
  """Episode lengths: ``constant`` or ``log_uniform`` in [min_horizon, horizon].

  Lengths are rounded up to a multiple of ``length`` (K).
  """

  length: int
  horizon: int
  min_horizon: int | None = None
  kind: str = "constant"

  def __post_init__(self):
    if self.kind not in ("constant", "log_uniform"):
      raise ValueError(f"TruncationSchedule.kind={self.kind!r}; expected constant or "
                       "log_uniform.")
    if not 1 <= self.length <= self.horizon:
      raise ValueError(f"truncation length {self.length} must be in [1, horizon="
                       f"{self.horizon}].")

  @property
  def max_truncations(self) -> int:
    return math.ceil(self.horizon / self.length)

  def sample(self, key: jax.Array) -> jax.Array:
    """An int32 episode length (a multiple of K, at least K)."""
    if self.kind == "constant":
      h = jnp.asarray(self.horizon, jnp.float32)
    else:
      lo = math.log(self.min_horizon or self.length)
      h = jnp.exp(jax.random.uniform(key, (), jnp.float32, lo, math.log(self.horizon)))
    n = jnp.clip(jnp.ceil(h / self.length), 1, self.max_truncations)
    return (n * self.length).astype(jnp.int32)


def pair_index(size: int, antithetic: bool) -> jax.Array:
  """Which pair each member belongs to (``i mod P/2``; ``i`` without pairing)."""
  if antithetic and size % 2:
    raise ValueError(f"an antithetic population needs an even size, got {size}.")
  return jnp.arange(size) % (size // 2) if antithetic else jnp.arange(size)


def partner(x: jax.Array) -> jax.Array:
  """The antithetic partner's value for every member (a half rotation)."""
  return jnp.roll(x, x.shape[0] // 2, axis=0)


def episode_keys(key: jax.Array, size: int, antithetic: bool) -> jax.Array:
  """uint32 ``[P, 2]`` keys, equal within a pair."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(pair_index(size, antithetic))


def fresh_members(init_fn: Callable[[jax.Array], Any], schedule: TruncationSchedule,
                  keys: jax.Array, dim: int) -> Population:
  """New episodes from ``keys`` (vmapped ``init_fn`` of the init sub-key)."""
  sub = lambda k, s: jax.random.fold_in(k, s)
  inner = jax.vmap(lambda k: init_fn(sub(k, INIT_STREAM)))(keys)
  horizon = jax.vmap(lambda k: schedule.sample(sub(k, HORIZON_STREAM)))(keys)
  size = keys.shape[0]
  return Population(inner=inner, step=jnp.zeros([size], jnp.int32), horizon=horizon,
                    normalizer=jnp.zeros([size], jnp.float32),
                    perturbation=jnp.zeros([size, dim], jnp.float32), episode_key=keys)


def init_population(init_fn, schedule: TruncationSchedule, key: jax.Array, size: int,
                    dim: int, *, antithetic: bool = True, stagger: bool = True
                    ) -> Population:
  """A population at the start of (staggered) episodes."""
  pop = fresh_members(init_fn, schedule, episode_keys(key, size, antithetic), dim)
  return stagger_horizons(pop, schedule) if stagger else pop


def stagger_horizons(pop: Population, schedule: TruncationSchedule) -> Population:
  """Cuts every first episode to a uniform number of truncations in [1, its sampled
  length / K] (drawn from the episode key, so pairs stay equal)."""
  n = pop.horizon // schedule.length
  u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, HORIZON_STREAM + 1))
               )(pop.episode_key)
  first = jnp.clip(jnp.ceil(u * n), 1, n).astype(jnp.int32) * schedule.length
  return pop._replace(horizon=first)


def finished(pop: Population, finite: jax.Array, *, antithetic: bool = True
             ) -> tuple[jax.Array, jax.Array]:
  """``(done, non-finite)`` masks: members at their horizon or whose run (or, paired,
  whose partner's) went non-finite are done; a pair is always done together."""
  bad = ~finite
  if antithetic:
    bad = bad | partner(bad)
  return (pop.step >= pop.horizon) | bad, ~finite


def restart(pop: Population, fresh: Population, done: jax.Array) -> Population:
  """``fresh``'s members where ``done``, ``pop``'s elsewhere."""
  select = lambda new, old: jnp.where(
      done.reshape(done.shape + (1,) * (old.ndim - 1)), new, old)
  return jax.tree.map(select, fresh, pop)


def reset_finished(init_fn, schedule: TruncationSchedule, pop: Population,
                   finite: jax.Array, key: jax.Array, *, antithetic: bool = True
                   ) -> tuple[Population, jax.Array, jax.Array]:
  """Restarts members at their horizon or whose run (or partner's) went non-finite.

  Returns ``(population, reset mask, non-finite mask)``; a pair is always reset
  together, so partners keep sharing their episode.
  """
  done, nonfinite = finished(pop, finite, antithetic=antithetic)
  fresh = fresh_members(init_fn, schedule, episode_keys(key, pop.step.shape[0], antithetic),
                        pop.perturbation.shape[1])
  return restart(pop, fresh, done), done, nonfinite


def restart_groups(init_fn, schedule: TruncationSchedule, dim: int, antithetic: bool,
                   group_keys: jax.Array, pops: tuple[Population, ...],
                   done: tuple[jax.Array, ...], first: jax.Array) -> tuple[Population, ...]:
  """Restarts the ``done`` members of several populations of one inner problem.

  Population ``g``'s new episodes are ``fresh_members`` of
  ``episode_keys(group_keys[g], P_g, antithetic)``, the same as :func:`reset_finished`
  and :func:`init_population` draw, but every population's members go through one
  vmapped ``init_fn``, so a task's populations (informed, blind) share one traced init.
  With ``first`` (a bool scalar) the new episodes are first episodes, staggered as in
  :func:`init_population`; a new run is ``done`` everywhere with ``first``.

  Args:
    init_fn: ``key -> inner state`` of every population.
    schedule: the episode lengths.
    dim: the size of theta (the perturbation accumulators' width).
    antithetic: whether members are in antithetic pairs.
    group_keys: uint32 ``[G, 2]``, one key per population.
    pops, done: the populations and bool ``[P_g]`` masks of members to restart.
    first: whether the new episodes are a run's first ones.
  """
  sizes = [d.shape[0] for d in done]
  keys = jnp.concatenate([episode_keys(group_keys[g], size, antithetic)
                          for g, size in enumerate(sizes)])
  fresh = fresh_members(init_fn, schedule, keys, dim)
  out, start = [], 0
  for pop, mask, size in zip(pops, done, sizes):
    new = jax.tree.map(lambda a, s=start, n=size: a[s:s + n], fresh)
    new = new._replace(horizon=jnp.where(first, stagger_horizons(new, schedule).horizon,
                                         new.horizon))
    out.append(restart(pop, new, mask))
    start += size
  return tuple(out)


def init_signature(init_fn: Callable[[jax.Array], Any]) -> Hashable:
  """What ``init_fn`` computes, as a hashable key: its jaxpr (text) for one key and a
  digest of every constant it closes over. Inits with equal signatures compute the same
  function, so their populations can share one compiled program (tasks of equal
  parameter shapes whose inits do not depend on the rest of their config, e.g. two
  quadratics of one dimension)."""
  closed = jax.make_jaxpr(init_fn)(jax.ShapeDtypeStruct((2,), jnp.uint32))
  consts = tuple((np.shape(c), str(np.result_type(c)),
                  hashlib.sha256(np.ascontiguousarray(np.asarray(c))).hexdigest())
                 for c in closed.consts)
  return str(closed.jaxpr), consts
