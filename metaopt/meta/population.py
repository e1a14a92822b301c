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
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

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
  if stagger:
    # First episode: a uniform number of truncations in [1, its sampled length / K].
    n = pop.horizon // schedule.length
    u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, HORIZON_STREAM + 1))
                 )(pop.episode_key)
    first = jnp.clip(jnp.ceil(u * n), 1, n).astype(jnp.int32) * schedule.length
    pop = pop._replace(horizon=first)
  return pop


def reset_finished(init_fn, schedule: TruncationSchedule, pop: Population,
                   finite: jax.Array, key: jax.Array, *, antithetic: bool = True
                   ) -> tuple[Population, jax.Array, jax.Array]:
  """Restarts members at their horizon or whose run (or partner's) went non-finite.

  Returns ``(population, reset mask, non-finite mask)``; a pair is always reset
  together, so partners keep sharing their episode.
  """
  size = pop.step.shape[0]
  bad = ~finite
  if antithetic:
    bad = bad | partner(bad)
  done = (pop.step >= pop.horizon) | bad
  fresh = fresh_members(init_fn, schedule, episode_keys(key, size, antithetic),
                        pop.perturbation.shape[1])
  select = lambda new, old: jnp.where(
      done.reshape(done.shape + (1,) * (old.ndim - 1)), new, old)
  return jax.tree.map(select, fresh, pop), done, ~finite
