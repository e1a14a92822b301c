"""The ``user_shaped`` preset: family pools redrawn per window, wide reparametrization."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tasks
from metaopt import lopt
from metaopt import mup
from metaopt.meta import MetaConfig, MetaTrainer, PRESETS, load_config
from metaopt.meta import outer
from metaopt.meta import population as pop_lib
from metaopt.meta import unroll
from metaopt.meta import validation
from metaopt.meta.config import MAX_AUGMENT_SCALE
from metaopt.meta.inner import LOInnerState, lo_problem
from tasks import suites

PRESET = PRESETS["user_shaped"]

# The preset's structure at toy sizes: a suite task kept beside a pooled family of
# one-tensor quadratics (fast to compile), a new config every outer step.
TOY = PRESET.replace(suite="smoke", task_names=("quadratic_d8_k10_rot_n0.1",),
                     families=("quadratic",), family_pool=3, family_samples=1,
                     family_window=1, hidden_size=2, num_pairs=2, num_blind_pairs=1,
                     truncation_length=5, horizon=20, min_horizon=10, validation_every=0,
                     outer_steps=3, seed=3)


def test_preset_loads_and_mixes_the_mup_suite_with_every_user_shaped_family():
  assert load_config("user_shaped") == PRESET
  assert set(PRESET.families) == set(suites.USER_SHAPED_FAMILY_NAMES)
  assert PRESET.keep_suite and PRESET.suite == "meta_train_default"
  assert PRESET.augment_scale == 3.0 and PRESET.augment_scale <= MAX_AUGMENT_SCALE
  assert (PRESET.min_horizon, PRESET.horizon) == (100, 3000)
  assert MetaConfig.from_dict(PRESET.to_dict()) == PRESET
  configs = outer._task_configs(PRESET)  # pylint: disable=protected-access
  suite = [e.config for e in tasks.get_suite("meta_train_default")]
  assert configs[:len(suite)] == suite
  pools = outer.family_pools(PRESET, configs)
  assert len(pools) == len(PRESET.families)
  assert all(4 <= len(p) <= PRESET.family_pool for p in pools)  # duplicates merged
  heldout_user = {e.config for e in tasks.get_suite("heldout-user")}
  assert not heldout_user & set(configs)
  assert [e.name for e in validation.selection_entries(PRESET.selection_suites)] == [
      e.name for s in ("validation", "validation-user") for e in tasks.get_suite(s)]


def test_active_tasks_redraw_each_familys_configs_per_window_deterministically():
  pools = ((3, 4, 5, 6), (7, 8, 9))
  config = MetaConfig(families=("mlp", "conv"), family_pool=4, family_samples=2,
                      family_window=5, seed=3)
  draws = [outer.active_tasks(config, 10, s, pools) for s in range(400)]
  assert draws == [outer.active_tasks(config, 10, s, pools) for s in range(400)]
  assert all(d[:3] == (0, 1, 2) and len(d) == 7 for d in draws)  # fixed tasks stay
  assert all(draws[s] == draws[s - s % 5] for s in range(400))  # constant per window
  windows = draws[::5]
  assert len(set(windows)) == 6 * 3  # every combination of 2 of 4 and 2 of 3
  seen = collections.Counter(i for d in windows for i in d[3:])
  assert set(seen) == set(range(3, 10))  # every pooled config gets trained
  other = [outer.active_tasks(config.replace(seed=4), 10, s, pools) for s in range(0, 400, 5)]
  assert other != windows
  # The default window is the longest episode; without pools nothing changes.
  assert outer.family_window(PRESET) == -(-PRESET.horizon // PRESET.truncation_length)
  assert outer.active_tasks(MetaConfig(), 7, 123) == tuple(range(7))
  with pytest.raises(ValueError, match="family_pool"):
    MetaConfig(families=("mlp",), family_pool=2, family_samples=3)
  with pytest.raises(ValueError, match="augment_scale"):
    MetaConfig(augment_scale=MAX_AUGMENT_SCALE + 1)


def test_a_pool_starts_with_the_configs_a_run_without_one_draws():
  plain = MetaConfig(families=("mlp", "conv"), family_samples=2, seed=5)
  pooled = plain.replace(family_pool=6)
  for a, b in zip(outer.family_configs(plain), outer.family_configs(pooled)):
    assert len(a) == 2 and len(b) == 6 and b[:2] == a
  assert outer.family_pools(plain, []) == ()


def _run(config: MetaConfig, steps: int):
  trainer = MetaTrainer(config)
  states, metrics = [trainer.init()], []
  for _ in range(steps):
    state, m = trainer.step(states[-1])
    states.append(state)
    metrics.append(m)
  return trainer, states, metrics


def test_toy_user_shaped_run_trains_another_pooled_config_per_window():
  trainer, states, metrics = _run(TOY, 3)
  assert [t.name for t in trainer.tasks][0] == "quadratic_d8_k10_rot_n0.1"
  (pool,) = trainer.pools
  assert len(pool) == 3 and 0 not in pool
  active = [tuple(m["tasks"]) for m in metrics]
  assert active == [tuple(trainer.tasks[i].name for i in trainer.active_tasks(s))
                    for s in range(3)]
  assert all(a[0] == "quadratic_d8_k10_rot_n0.1" and len(a) == 2 for a in active)
  assert len({a[1] for a in active}) == 2  # seed 3 draws a new config at step 1
  for s, (before, after) in enumerate(zip(states, states[1:])):
    for i in set(range(len(trainer.tasks))) - set(trainer.active_tasks(s)):
      for g in trainer.groups[i]:  # a paused config keeps its populations as they were
        jax.tree.map(np.testing.assert_array_equal, before.populations[g.name],
                     after.populations[g.name])
  for m in metrics:
    assert np.isfinite(m["meta_loss"]) and np.isfinite(m["grad_norm"])
  for leaf in jax.tree.leaves(states[-1].theta):
    assert np.all(np.isfinite(np.asarray(leaf)))


def test_recurrent_user_model_meta_trains_under_shard_map():
  """nn.RNN's constant zero carry inside the sharded unroll (a varying-axes error once)."""
  config = tasks.SPRecurrentConfig("gru", "language_model", width=8, length=6,
                                   batch_size=4, vocab_size=16)
  meta = TOY.replace(suite="", task_names=(), families=(), family_pool=0,
                     tasks=(tasks.config_to_json(config),), num_blind_pairs=0, num_pairs=1)
  trainer, states, metrics = _run(meta, 1)
  assert trainer.tasks[0].config == config
  assert np.isfinite(metrics[0]["meta_loss"]) and np.isfinite(metrics[0]["grad_norm"])


@pytest.mark.parametrize("scale", [1e3, 1e-3])
def test_extreme_reparametrization_scales_stay_bounded(scale):
  """A user-shaped net at Celo's extreme per-tensor scales: bounded, finite meta-loss."""
  task = tasks.build(tasks.SPRegressionConfig(width=8, depth=1, batch_size=32), 20)
  lo = outer.warm_start(MetaConfig(hidden_size=2))
  problem = lo_problem(task, lo.config, augment_scale=PRESET.augment_scale)
  schedule = pop_lib.TruncationSchedule(10, 20)
  pop = pop_lib.init_population(problem.init, schedule, jax.random.PRNGKey(0), 2, 1,
                                antithetic=False, stagger=False)
  update_scales = mup.update_scales(task.roles)

  def rescale(inner):
    p = jax.tree.map(jnp.multiply, inner.params, inner.scales)
    s = jax.tree.map(lambda x: jnp.full([], scale, jnp.float32), inner.scales)
    w = jax.tree.map(jnp.divide, p, s)
    return LOInnerState(w, lopt.init_state(w, update_scales), s)

  pop = pop._replace(inner=jax.vmap(rescale)(pop.inner))
  run = jax.jit(jax.vmap(lambda m: unroll.truncate(problem, 10, PRESET.loss_bound,
                                                    lo.theta, m, log_loss=True)))
  _, meta_loss, _ = run(pop)
  meta_loss = np.asarray(meta_loss)
  assert np.all(np.isfinite(meta_loss)), meta_loss
  assert np.all(meta_loss <= np.log(PRESET.loss_bound) + 1e-6), meta_loss


@pytest.mark.slow
def test_user_shaped_preset_two_outer_steps_on_every_family():
  """The preset itself (every suite task, every family) at tiny unroll sizes: 14
  programs to compile, 10-30 minutes on 2 shared cores."""
  config = PRESET.replace(family_pool=2, family_samples=1,  # window: both steps
                          hidden_size=2, num_pairs=1, num_blind_pairs=0,
                          truncation_length=5, horizon=10, min_horizon=5,
                          validation_every=0)
  trainer, states, metrics = _run(config, 2)
  assert len(trainer.pools) == len(PRESET.families)
  for m in metrics:
    assert np.isfinite(m["meta_loss"]) and np.isfinite(m["grad_norm"])
    assert len(m["tasks"]) == len(tasks.get_suite("meta_train_default")) + len(
        PRESET.families)
  for leaf in jax.tree.leaves(states[-1].theta):
    assert np.all(np.isfinite(np.asarray(leaf)))


def test_score_uses_the_runs_selection_suites(tmp_path, monkeypatch, capsys):
  import meta_train  # pylint: disable=g-import-not-at-top
  from metaopt.meta import run  # pylint: disable=g-import-not-at-top
  config = TOY.replace(families=(), family_pool=0, num_blind_pairs=0, outer_steps=1,
                       checkpoint_every=1, selection_suites=("smoke",))
  run.meta_train(config, tmp_path / "run", progress=False)
  scored = {}

  def fake_score(lo_config, thetas, entries, **kwargs):
    del lo_config, kwargs
    scored["entries"] = [e.name for e in entries]
    return {e.name: {label: 1.0 for label in thetas} for e in entries}

  monkeypatch.setattr(validation, "score_thetas", fake_score)
  assert meta_train.main(["--score", "1", "--out", str(tmp_path / "run")]) == 0
  assert scored["entries"] == [e.name for e in tasks.get_suite("smoke")]
  assert "step 1: mean +0.0000" in capsys.readouterr().out


def test_checkpoints_from_before_the_new_fields_still_resume():
  from metaopt.meta import checkpointing as ckpt  # pylint: disable=g-import-not-at-top
  lo_config = outer.warm_start(MetaConfig()).config
  expected = ckpt.run_metadata(MetaConfig(), lo_config, ["a"])
  old = {**expected, "config": {k: v for k, v in expected["config"].items()
                                if k not in ("keep_suite", "family_pool", "family_window",
                                             "selection_suites")}}
  ckpt.check_metadata(old, expected, "old run")  # missing fields read as defaults
  pooled = ckpt.run_metadata(MetaConfig(family_pool=4), lo_config, ["a"])
  with pytest.raises(ckpt.CheckpointError, match="family_pool"):
    ckpt.check_metadata(old, pooled, "old run")
