"""Start-up of meta-training: one small init program per distinct task init, same values.

``MetaTrainer.init`` compiles one restart program per distinct inner init (shared by
tasks whose inits compute the same function) instead of one program holding every
population's init, and the task programs leave resets to those programs. Neither may
change a value: the first episodes equal the per-population ``init_population`` the
trainer used before, and outer steps equal steps with the resets inside the estimator.
"""

from __future__ import annotations

import jax
import numpy as np

import tasks
from metaopt.meta import MetaConfig, MetaTrainer
from metaopt.meta import estimators as est_lib
from metaopt.meta import outer

QUADRATIC_A = tasks.QuadraticConfig(dim=8, condition_number=10.0)
QUADRATIC_B = tasks.QuadraticConfig(dim=8, condition_number=100.0, rotate=True)
QUADRATIC_C = tasks.QuadraticConfig(dim=16, condition_number=10.0)
MLP = tasks.MLPConfig(width=16, depth=1, batch_size=16)

SMALL = dict(hidden_size=2, num_pairs=2, num_blind_pairs=1, truncation_length=5,
             horizon=20, min_horizon=5, validation_every=0)


def _config(*configs, **changes) -> MetaConfig:
  return MetaConfig(tasks=tuple(tasks.config_to_json(c) for c in configs),
                    **{**SMALL, **changes})


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=jax.tree_util.keystr(path))


def test_tasks_of_equal_inits_share_one_compiled_init_program():
  trainer = MetaTrainer(_config(QUADRATIC_A, QUADRATIC_B, QUADRATIC_C))
  trainer.init()
  # Two quadratics of dimension 8 (other curvature) draw x0 alike: one program, one
  # compilation for both tasks' informed and blind populations; dimension 16 another.
  assert trainer.init_programs() == 2
  shared = trainer.restart_program(0)
  assert trainer.restart_program(1) is shared
  assert trainer.restart_program(2) is not shared
  assert shared._cache_size() == 1  # pylint: disable=protected-access


def test_init_equals_one_init_population_per_population():
  """Bitwise: the first episodes of every population (params, LO state, scales,
  staggered horizons, keys) equal the reference path's, with augmentation on."""
  trainer = MetaTrainer(_config(MLP, QUADRATIC_A, augment_scale=2.0))
  _assert_trees_equal(trainer.init(), jax.jit(trainer._init_state)())  # pylint: disable=protected-access


def test_steps_equal_steps_with_resets_inside_the_estimator():
  """From the same state, an outer step (resets included: episodes of 5-20 steps,
  K = 5) gives the inner states, steps, horizons and keys of the same step with every
  reset done inside the task's program, as before, bitwise; the meta-gradient and the
  PES accumulators come from another program (XLA fuses their arithmetic differently)
  and agree to float32 rounding."""
  config = _config(MLP, QUADRATIC_A, augment_scale=1.0)
  new, old = MetaTrainer(config), MetaTrainer(config)
  old.estimator = est_lib.get_estimator(config.estimator, config.sigma, reset=True)
  old.restart_program = lambda i: lambda keys, pops, done, first: pops  # already reset
  old.prepare = lambda state: (state, ())  # every task started and compiled by new.init
  state = new.init()
  resets, steps = 0, 6
  # Reordered float32 sums: the meta-gradient sums n = members x K x tasks terms, each
  # order within n * eps (relative) of the other; carried linearly through `steps` outer
  # steps. Any other difference (a reset missed, a wrong key) is O(1).
  members = 2 * (config.num_pairs + config.num_blind_pairs)
  n = members * config.truncation_length * len(config.tasks)
  rtol = steps * n * float(np.finfo(np.float32).eps)
  for _ in range(steps):
    a, metrics = new.step(state)
    b, _ = old.step(state)
    resets += metrics["resets"]
    exact = lambda pops: {k: (p.inner, p.step, p.horizon, p.episode_key)
                          for k, p in pops.items()}
    _assert_trees_equal(exact(a.populations), exact(b.populations))
    rounded = lambda s: (s.theta, s.opt_state,
                         {k: (p.perturbation, p.normalizer) for k, p in s.populations.items()})
    for x, y in zip(jax.tree.leaves(rounded(a)), jax.tree.leaves(rounded(b))):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                                 atol=rtol * float(np.max(np.abs(np.asarray(y)), initial=0)))
    state = a
  assert resets > 0, "some episodes ended and were restarted"


def test_pooled_tasks_start_when_first_drawn_with_the_values_of_a_full_init():
  """With family pools, init starts (and compiles) only the tasks of step 0; a config
  drawn later starts then, with its first episodes' values, so every step is bitwise
  the step of a run whose init started every population."""
  config = MetaConfig(suite="", families=("quadratic",), family_pool=3, family_samples=1,
                      family_window=1, seed=3, **SMALL)
  lazy, eager = MetaTrainer(config), MetaTrainer(config)
  state = lazy.init()
  first = set(lazy.active_tasks(0))
  later = {i for s in range(1, 3) for i in lazy.active_tasks(s)} - first
  assert first and later, "seed 3 draws another config at step 1 or 2"
  assert set(lazy.unstarted_tasks(state, tuple(range(len(lazy.tasks))))) == (
      set(range(len(lazy.tasks))) - first)
  outer.compile_all(lazy.lower_programs(state))  # as meta_train's start-up does
  assert lazy._compiled_programs == first | {-1}  # pylint: disable=protected-access
  reference = jax.jit(eager._init_state)()  # pylint: disable=protected-access
  full = state._replace(populations=reference.populations)
  for i in first:
    for g in lazy.groups[i]:
      _assert_trees_equal(state.populations[g.name], reference.populations[g.name])
  drawn = set(first)
  for step in range(3):
    drawn |= set(lazy.active_tasks(step))
    state, _ = lazy.step(state)
    full, _ = eager.step(full)
    started = lambda s: (s.theta, s.opt_state, s.step, {  # pylint: disable=cell-var-from-loop
        g.name: s.populations[g.name] for i in drawn for g in lazy.groups[i]})
    _assert_trees_equal(started(state), started(full))
  assert not lazy.unstarted_tasks(state, tuple(sorted(first | later)))
