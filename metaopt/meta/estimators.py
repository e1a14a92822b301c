"""Meta-gradient estimators over a population: antithetic PES, truncated ES, TBPTT.

All three share one interface::

  estimate = estimator(spec, theta, population, key)   # -> Estimate
  estimate.meta_loss, estimate.gradient, estimate.population, estimate.metrics

with ``theta`` the flat meta-parameters (``jax.flatten_util.ravel_pytree``). Each runs
one truncation of every member, then resets members at their horizon or whose run went
non-finite (:func:`metaopt.meta.population.reset_finished`). With ``reset=False`` the
estimator only marks them (``Estimate.done``, ``Estimate.reset_key``) and the caller
restarts them (:func:`metaopt.meta.population.restart`) in a program of its own: the
inner problem's ``init`` then stays out of the unroll's program, which compiles about
twice as fast for an MLP task, and one init program serves the first episodes and
every reset.

With ``L(theta)`` a truncation's meta-loss, ``sigma`` the perturbation std and ``N``
antithetic pairs ``(+eps_i, -eps_i)``, ``eps_i ~ N(0, sigma^2 I)``:

* truncated ES: ``g = 1/(2 N sigma^2) sum_i (L(theta + eps_i) - L(theta - eps_i)) eps_i``,
  an unbiased estimate of the gradient of the Gaussian-smoothed truncation loss with the
  incoming inner state held fixed -- the quantity TBPTT differentiates exactly.
* PES (Vicol et al, "Unbiased Gradient Estimation in Unrolled Computation Graphs with
  Persistent Evolution Strategies", arXiv:2112.13835, 2021, Alg. 2): each member keeps
  its own inner state and the sum ``xi_i`` of every perturbation of its episode so far;
  ``g = 1/(2 N sigma^2) sum_i (L_i^+ - L_i^-) xi_i``. Summed over an episode's
  truncations it is unbiased for the gradient of the whole episode's loss, including
  theta's effect through the inner state that truncation ignores.
* TBPTT: exact reverse-mode gradient of the truncation's loss through its K steps.

A NaN/inf meta-gradient (only TBPTT can produce one: the ES losses are bounded) is
replaced by zero and counted in ``metrics["nonfinite_grad"]``.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from metaopt.meta import population as pop_lib
from metaopt.meta import unroll as unroll_lib
from metaopt.meta.population import Population
from metaopt.meta.unroll import UnrollSpec


class Estimate(NamedTuple):
  """Output of an estimator: the meta-loss, flat meta-gradient, next population.

  ``done`` (bool ``[P]``) marks the members whose episode ended; with ``reset=False``
  they are still in ``population`` as they finished, and their next episodes are
  ``fresh_members(init, schedule, episode_keys(reset_key, P, antithetic), d)``.
  """

  meta_loss: jax.Array
  gradient: jax.Array
  population: Population
  metrics: dict
  done: jax.Array | None = None
  reset_key: jax.Array | None = None


def antithetic_noise(key: jax.Array, num_pairs: int, dim: int, sigma: float) -> jax.Array:
  """``[2N, d]``: ``N`` draws of ``N(0, sigma^2 I)`` followed by their negatives."""
  eps = sigma * jax.random.normal(key, (num_pairs, dim), jnp.float32)
  return jnp.concatenate([eps, -eps])


def _finish(spec: UnrollSpec, pop: Population, losses, finite, gradient, key,
            antithetic: bool, reset: bool) -> Estimate:
  if reset:
    pop, done, nonfinite = pop_lib.reset_finished(spec.problem.init, spec.schedule, pop,
                                                  finite, key, antithetic=antithetic)
  else:
    done, nonfinite = pop_lib.finished(pop, finite, antithetic=antithetic)
  grad_ok = jnp.all(jnp.isfinite(gradient))
  metrics = {"nonfinite": jnp.sum(nonfinite), "resets": jnp.sum(done),
             "nonfinite_grad": (~grad_ok).astype(jnp.int32)}
  return Estimate(jnp.mean(losses), jnp.where(grad_ok, gradient, 0.0), pop, metrics,
                  done, key)


def _antithetic(spec: UnrollSpec, theta: jax.Array, pop: Population, key: jax.Array,
                sigma: float, persistent: bool, reset: bool) -> Estimate:
  size, dim = pop.perturbation.shape
  noise_key, reset_key = jax.random.split(key)
  eps = antithetic_noise(noise_key, size // 2, dim, sigma)
  acc = pop.perturbation + eps if persistent else eps
  pop, losses, finite = unroll_lib.unroll_population(spec, theta[None] + eps, pop)
  n = size // 2
  diff = losses[:n] - losses[n:]
  gradient = diff @ acc[:n] / (n * 2 * sigma**2)
  if persistent:
    pop = pop._replace(perturbation=acc)
  return _finish(spec, pop, losses, finite, gradient, reset_key, antithetic=True,
                 reset=reset)


def pes(spec: UnrollSpec, theta: jax.Array, pop: Population, key: jax.Array, *,
        sigma: float = 0.01, reset: bool = True) -> Estimate:
  """Antithetic PES with per-member perturbation accumulators."""
  return _antithetic(spec, theta, pop, key, sigma, persistent=True, reset=reset)


def truncated_es(spec: UnrollSpec, theta: jax.Array, pop: Population, key: jax.Array,
                 *, sigma: float = 0.01, reset: bool = True) -> Estimate:
  """Truncated antithetic ES (fresh perturbations every truncation)."""
  return _antithetic(spec, theta, pop, key, sigma, persistent=False, reset=reset)


def tbptt(spec: UnrollSpec, theta: jax.Array, pop: Population, key: jax.Array, *,
          sigma: float = 0.0, reset: bool = True) -> Estimate:
  """Truncated backprop through time, averaged over independent members."""
  del sigma
  pop, losses, grads, finite = unroll_lib.unroll_population_with_grad(spec, theta, pop)
  ok = finite & jnp.all(jnp.isfinite(grads), axis=1)
  gradient = jnp.mean(jnp.where(ok[:, None], grads, 0.0), axis=0)
  return _finish(spec, pop, losses, finite, gradient, key, antithetic=False, reset=reset)


ESTIMATORS: dict[str, Callable[..., Estimate]] = {
    "pes": pes,
    "es": truncated_es,
    "tbptt": tbptt,
}


def is_antithetic(name: str) -> bool:
  """Whether the estimator pairs members antithetically (PES, ES)."""
  return name != "tbptt"


def get_estimator(name: str, sigma: float, *, reset: bool = True
                  ) -> Callable[..., Estimate]:
  """``(spec, theta, population, key) -> Estimate`` for a name of :data:`ESTIMATORS`."""
  if name not in ESTIMATORS:
    raise ValueError(f"unknown estimator {name!r}; expected one of {sorted(ESTIMATORS)}.")
  return functools.partial(ESTIMATORS[name], sigma=sigma, reset=reset)
