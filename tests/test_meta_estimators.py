"""Meta-gradient estimators on a smooth toy problem with a known full-unroll gradient.

The toy inner problem: heavy-ball momentum on a deterministic diagonal quadratic, with
meta-parameters theta = (per-coordinate log step sizes, momentum logit). Everything is
smooth, so

* truncated ES estimates the gradient of the Gaussian-smoothed truncation loss; with
  many antithetic pairs it agrees with TBPTT on the same truncation;
* PES summed over all truncations of an episode estimates the gradient of the whole
  episode's loss (the full-unroll autodiff gradient), while TBPTT summed over the same
  truncations misses theta's effect through the carried inner state and is biased
  (it underestimates how much larger steps help later truncations).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from metaopt.meta import estimators
from metaopt.meta import population as pop_lib
from metaopt.meta import unroll
from metaopt.meta.inner import InnerProblem

DIM = 8
CURVATURES = jnp.logspace(-1.5, 0.0, DIM)
K, T = 5, 40  # truncation length, horizon (8 truncations)
BOUND = 10.0
SIGMA = 0.01
PAIRS = 4096

# Stated agreement levels with 4096 antithetic pairs (measured: cosines 0.998, relative
# errors 0.06 for ES vs TBPTT and for PES vs the full unroll; TBPTT's summed truncation
# gradients are 0.56 off the full unroll in relative norm, cosine 0.85).
MIN_COSINE = 0.99
MAX_REL_ERROR = 0.15
MIN_REL_ERROR_TBPTT_FULL = 0.35


def toy_problem(nan_after: int | None = None) -> InnerProblem:
  """Heavy ball on 0.5 sum(h x^2) from x = 1 (every member alike, so one TBPTT member
  and the full unroll see the same problem as the ES populations); with ``nan_after``,
  a random half of the episodes (flag ``bad``) return NaN losses from that step on."""

  def init(key):
    bad = jax.random.bernoulli(key).astype(jnp.float32)
    return {"x": jnp.ones(DIM), "m": jnp.zeros(DIM), "bad": bad}

  def step(theta, s, key, t, horizon):
    del key, horizon
    loss = 0.5 * jnp.sum(CURVATURES * s["x"]**2)
    if nan_after is not None:
      loss = jnp.where((t >= nan_after) & (s["bad"] > 0), jnp.nan, loss)
    m = jax.nn.sigmoid(theta["mom"]) * s["m"] + CURVATURES * s["x"]
    return {"x": s["x"] - jnp.exp(theta["log_lr"]) * m, "m": m, "bad": s["bad"]}, loss

  return InnerProblem(init, step, "toy")


THETA = {"log_lr": jnp.log(jnp.full((DIM,), 0.3)), "mom": jnp.asarray(0.5)}
FLAT, UNRAVEL = ravel_pytree(THETA)


def _spec(problem=None):
  return estimators.UnrollSpec(problem or toy_problem(), pop_lib.TruncationSchedule(K, T),
                               BOUND, UNRAVEL)


def _population(size: int, antithetic: bool, problem=None):
  problem = problem or toy_problem()
  return pop_lib.init_population(problem.init, pop_lib.TruncationSchedule(K, T),
                                 jax.random.PRNGKey(0), size, FLAT.size,
                                 antithetic=antithetic, stagger=False)


def _episode_gradients(name: str, size: int, antithetic: bool):
  """(first truncation's estimate, sum over the episode's T/K truncations)."""
  spec = _spec()
  fn = jax.jit(lambda p, k: estimators.ESTIMATORS[name](spec, FLAT, p, k, sigma=SIGMA))
  pop = _population(size, antithetic)
  first, total = None, 0.0
  for i in range(T // K):
    e = fn(pop, jax.random.PRNGKey(100 + i))
    pop = e.population
    first = e.gradient if first is None else first
    total = total + e.gradient
  assert int(pop.step[0]) == 0, "every member finished its episode and was reset"
  return np.asarray(first), np.asarray(total)


def _full_unroll_gradient():
  """d/dtheta of the episode's summed truncation losses, by autodiff through all T."""
  problem = toy_problem()
  member = jax.tree.map(lambda a: a[0], _population(1, antithetic=False))

  def loss(flat):
    _, mean_loss, _ = unroll.truncate(problem, T, BOUND, UNRAVEL(flat), member)
    return mean_loss * (T // K)  # sum over truncations of their means

  return np.asarray(jax.jit(jax.grad(loss))(FLAT))  # eagerly, the scan's grad runs op by op


def _cosine(a, b):
  return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _rel_error(a, ref):
  return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def gradients():
  es_first, _ = _episode_gradients("es", 2 * PAIRS, True)
  pes_first, pes_total = _episode_gradients("pes", 2 * PAIRS, True)
  tb_first, tb_total = _episode_gradients("tbptt", 1, False)
  return dict(es_first=es_first, pes_first=pes_first, pes_total=pes_total,
              tb_first=tb_first, tb_total=tb_total, full=_full_unroll_gradient())


def test_truncated_es_agrees_with_tbptt_on_a_truncation(gradients):
  g = gradients
  assert _cosine(g["es_first"], g["tb_first"]) > MIN_COSINE
  assert _rel_error(g["es_first"], g["tb_first"]) < MAX_REL_ERROR
  # On the first truncation PES has nothing accumulated yet: it is truncated ES.
  assert _cosine(g["pes_first"], g["tb_first"]) > MIN_COSINE


def test_pes_over_an_episode_is_unbiased_where_tbptt_is_biased(gradients):
  g = gradients
  assert _cosine(g["pes_total"], g["full"]) > MIN_COSINE
  pes_err = _rel_error(g["pes_total"], g["full"])
  tb_err = _rel_error(g["tb_total"], g["full"])
  assert pes_err < MAX_REL_ERROR
  assert tb_err > MIN_REL_ERROR_TBPTT_FULL
  assert tb_err > 3 * pes_err
  # The bias has the known sign: truncation sees too little benefit from larger steps.
  assert np.linalg.norm(g["tb_total"]) < 0.8 * np.linalg.norm(g["full"])


def test_antithetic_noise_pairs():
  eps = estimators.antithetic_noise(jax.random.PRNGKey(0), 3, 5, 0.1)
  np.testing.assert_array_equal(eps[:3], -eps[3:])
  keys = pop_lib.episode_keys(jax.random.PRNGKey(1), 6, antithetic=True)
  np.testing.assert_array_equal(keys[:3], keys[3:])


@pytest.mark.parametrize("name", sorted(estimators.ESTIMATORS))
def test_nonfinite_members_are_reset_and_never_reach_the_gradient(name):
  problem = toy_problem(nan_after=2)
  spec = _spec(problem)
  antithetic = estimators.is_antithetic(name)
  pop = _population(16, antithetic, problem)
  bad0 = np.asarray(pop.inner["bad"] > 0)
  assert 0 < bad0.sum() < 16
  e = jax.jit(lambda p, k: estimators.ESTIMATORS[name](spec, FLAT, p, k, sigma=SIGMA))(
      pop, jax.random.PRNGKey(3))
  assert np.all(np.isfinite(e.gradient)) and np.isfinite(e.meta_loss)
  assert np.linalg.norm(e.gradient) > 0, "the finite members still give a gradient"
  assert int(e.metrics["nonfinite"]) == bad0.sum()
  assert int(e.metrics["nonfinite_grad"]) == 0
  # Non-finite members (and their antithetic partners) restart their episode.
  reset = bad0 | (np.roll(bad0, 8) if antithetic else False)
  np.testing.assert_array_equal(np.asarray(e.population.step) == 0, reset)
  assert np.all(np.asarray(e.population.perturbation)[reset] == 0)
  # Their loss counts as the bound: the meta-loss is pulled up, not NaN.
  assert float(e.meta_loss) > BOUND * bad0.mean() * 0.5


def test_staggered_first_horizons_and_schedules():
  schedule = pop_lib.TruncationSchedule(K, T, min_horizon=10, kind="log_uniform")
  h = np.asarray(jax.jit(jax.vmap(schedule.sample))(
      jax.random.split(jax.random.PRNGKey(0), 256)))
  assert np.all(h % K == 0) and h.min() >= 10 and h.max() <= T
  assert len(np.unique(h)) > 3
  pop = jax.jit(lambda k: pop_lib.init_population(
      toy_problem().init, pop_lib.TruncationSchedule(K, T), k, 64, FLAT.size))(
          jax.random.PRNGKey(0))
  first = np.asarray(pop.horizon)
  assert np.all(first % K == 0) and first.min() >= K and first.max() <= T
  assert len(np.unique(first)) > 3, "resets are staggered across pairs"
  np.testing.assert_array_equal(first[:32], first[32:])
