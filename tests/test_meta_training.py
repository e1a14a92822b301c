"""Meta-training with the real learned optimizer: it improves, survives NaNs, configs."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metaopt
import tasks
from metaopt.meta import MetaConfig, MetaTrainer, PRESETS, load_config
from metaopt.meta import outer
from metaopt.meta import sharding
from metaopt.meta.inner import lo_problem
from metaopt.meta.validation import make_evaluator

QUADRATIC = tasks.QuadraticConfig(dim=8, condition_number=10.0)

# A small LO (hidden width 2) keeps compilation short; the warm start is still muAdamW.
TINY = MetaConfig(tasks=(tasks.config_to_json(QUADRATIC),), hidden_size=2, num_pairs=4,
                  num_blind_pairs=0, truncation_length=10, horizon=60, min_horizon=20,
                  outer_learning_rate=0.05, sigma=0.02, outer_steps=40,
                  validation_every=0)


def test_short_meta_training_lowers_the_meta_loss():
  trainer = MetaTrainer(TINY)
  evaluate = make_evaluator(trainer.lo_config, trainer.tasks[0], num_steps=TINY.horizon,
                            seeds=4, loss_bound=TINY.loss_bound, seed=7)
  state = trainer.init()
  before = float(evaluate(state.theta)["meta_loss"])
  losses = []
  for _ in range(TINY.outer_steps):
    state, metrics = trainer.step(state)
    losses.append(metrics["meta_loss"])
  after = float(evaluate(state.theta)["meta_loss"])
  # muAdamW's lr 1e-3 barely moves this quadratic in 60 steps (meta-loss ~0.99).
  assert after < before - 0.05, (before, after)
  assert np.mean(losses[-10:]) < np.mean(losses[:10])
  assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(state.theta))
  assert int(state.step) == TINY.outer_steps


def nan_task(probability: float = 0.02) -> tasks.Task:
  """A quadratic whose training loss is NaN on a random ``probability`` of batches."""
  base = tasks.build(QUADRATIC)

  def sample_batch(key, split="train"):
    k1, k2 = jax.random.split(key)
    return {**base.sample_batch(k1, split), "u": jax.random.uniform(k2)}

  def loss(params, batch):
    value = base.loss(params, {"noise": batch["noise"]})
    return jnp.where(batch["u"] < probability, jnp.nan, value)

  return dataclasses.replace(base, name="nan_quadratic", loss=loss, sample_batch=sample_batch)


# TBPTT through the real LO compiles slowly; test_meta_estimators covers its NaN
# handling on the toy problem.
@pytest.mark.parametrize("estimator", ["pes", pytest.param("tbptt", marks=pytest.mark.slow)])
def test_nan_producing_task_never_makes_theta_nan(estimator):
  config = TINY.replace(estimator=estimator, outer_steps=4)
  trainer = MetaTrainer(config, task_list=[nan_task()])
  state = trainer.init()
  nonfinite = 0
  for _ in range(config.outer_steps):
    state, metrics = trainer.step(state)
    nonfinite += metrics["nonfinite"]
    assert np.isfinite(metrics["meta_loss"]) and np.isfinite(metrics["grad_norm"])
    assert metrics["meta_loss"] <= config.loss_bound
  assert nonfinite > 0, "the task produced NaNs and they were counted"
  for leaf in jax.tree.leaves(state.theta):
    assert np.all(np.isfinite(np.asarray(leaf)))
  for leaf in jax.tree.leaves(state.populations):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert np.all(np.isfinite(np.asarray(leaf))), "NaN members were reset"


def test_config_json_round_trip(tmp_path):
  for name, preset in PRESETS.items():
    path = tmp_path / f"{name}.json"
    path.write_text(preset.to_json())
    assert load_config(path) == preset
    assert json.loads(path.read_text())["suite"] == preset.suite
  custom = TINY.replace(task_names=("a",))
  assert MetaConfig.from_dict(json.loads(custom.to_json())) == custom
  # Task configs may be given as JSON objects in a file.
  d = json.loads(TINY.to_json())
  assert isinstance(d["tasks"][0], dict)
  assert MetaConfig.from_dict(d).tasks == TINY.tasks


def test_config_errors(tmp_path):
  with pytest.raises(ValueError, match="unknown MetaConfig fields"):
    MetaConfig.from_dict({"sigmaa": 0.1})
  with pytest.raises(ValueError, match="estimator"):
    MetaConfig(estimator="reinforce")
  with pytest.raises(ValueError, match="neither a preset"):
    load_config(tmp_path / "missing.json")
  with pytest.raises(ValueError, match="not in suite"):
    outer.resolve_tasks(MetaConfig(task_names=("no_such_task",)))


def test_sp_warm_start_and_mismatched_artifact(tmp_path):
  """mup=False meta-trains an SP LO; an artifact warm start must agree on muP."""
  assert outer.warm_start(MetaConfig(mup=False)).config.mup is False
  assert outer.warm_start(MetaConfig()).config.mup is True
  path = tmp_path / "sp_lo"
  metaopt.checkpoint.save(metaopt.LearnedOptimizer.from_classical("adamw"), path)
  with pytest.raises(ValueError, match="has mup=False but MetaConfig.mup=True"):
    outer.warm_start(MetaConfig(warm_start=str(path)))
  with pytest.raises(ValueError, match="MetaConfig.mup=1"):
    MetaConfig(mup=1)


def test_release_configs_load():
  """The configs the shipped artifacts were meta-trained with stay loadable."""
  root = pathlib.Path(__file__).parent.parent / "configs"
  for name in ("release_mup.json", "release_mup_finetune.json",
               "release_mup_finetune_decay.json", "release_sp.json"):
    config = load_config(root / name)
    assert config.mup == (name != "release_sp.json")
    names = [t.name for t in outer.resolve_tasks(config)]
    assert len(names) == len(set(names)) >= 7


def test_presets_name_existing_tasks():
  for preset in PRESETS.values():
    names = {e.name for e in tasks.get_suite(preset.suite)}
    assert set(preset.task_names) <= names
    run_names = set(preset.task_names) or names  # empty task_names: the whole suite
    assert not preset.validation_task or preset.validation_task in run_names


def test_task_windows_are_deterministic_and_cover_the_tasks():
  config = MetaConfig(tasks_per_step=2, resample_every=5, seed=3)
  windows = [outer.active_tasks(config, 7, s) for s in range(0, 200)]
  assert windows == [outer.active_tasks(config, 7, s) for s in range(0, 200)]
  assert all(len(w) == 2 and len(set(w)) == 2 for w in windows)
  assert all(windows[s] == windows[s - s % 5] for s in range(200))
  assert set(i for w in windows for i in w) == set(range(7))
  # tasks_per_step=0 (the default): every task, every step.
  assert outer.active_tasks(MetaConfig(), 7, 123) == tuple(range(7))


def test_population_must_split_over_devices():
  class FakeMesh:
    size = 4
  sharding.check_population_size(8, FakeMesh(), "ok")
  with pytest.raises(ValueError, match="cannot be split evenly over 4 devices"):
    sharding.check_population_size(6, FakeMesh(), "t00_blind")


def test_augmentation_rescales_tensors_without_changing_the_function():
  task = tasks.build(QUADRATIC)
  lo_config = outer.warm_start(TINY).config
  plain = lo_problem(task, lo_config)
  aug = lo_problem(task, lo_config, augment_scale=2.0)
  key = jax.random.PRNGKey(0)
  s_plain, s_aug = plain.init(key), aug.init(key)
  scale = float(s_aug.scales["x"])
  assert 1e-2 <= scale <= 1e2 and scale != 1.0
  np.testing.assert_allclose(s_aug.params["x"] * scale, s_plain.params["x"], rtol=1e-6)
  batch = task.sample_batch(key)
  np.testing.assert_allclose(
      task.loss(jax.tree.map(jnp.multiply, s_aug.params, s_aug.scales), batch),
      task.loss(s_plain.params, batch), rtol=1e-5)


def test_metrics_log_plot_and_progress(tmp_path):
  import io
  from metaopt.meta import logging as log_lib
  log = log_lib.MetricsLog(tmp_path / log_lib.METRICS_FILE)
  for mode_loss, theta in ((0.5, "warm_start"), (0.3, "current")):
    log.write({"kind": "validation", "step": 0 if theta == "warm_start" else 3,
               "theta": theta, "informed": {"meta_loss": mode_loss},
               "blind": {"meta_loss": mode_loss + 0.1}})
  for s in range(1, 6):
    log.write({"kind": "train", "step": s, "meta_loss": 1.0 / s})
  log.truncate_after(3)
  assert [r["step"] for r in log_lib.read_metrics(tmp_path)
          if r["kind"] == "train"] == [1, 2, 3]
  png = log_lib.plot_metrics(tmp_path)
  assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
  stream = io.StringIO()  # not a terminal: plain lines every `every` steps
  bar = log_lib.Progress(10, stream=stream, every=5)
  for s in range(1, 11):
    bar.update(s, 0.5)
  lines = stream.getvalue().splitlines()
  assert [l.split()[1] for l in lines] == ["1/10", "5/10", "10/10"]
  assert "meta-loss 0.5000" in lines[-1] and "ETA" in lines[-1]


def test_log_objective_is_the_mean_log_of_the_normalized_losses():
  """log_loss=True over K steps == mean of log(per-step linear terms), step by step."""
  from metaopt.meta import population as pop_lib
  from metaopt.meta import unroll
  trainer = MetaTrainer(TINY)
  problem = lo_problem(trainer.tasks[0], trainer.lo_config, informed=True)
  schedule = pop_lib.TruncationSchedule(20, 20)
  pop = pop_lib.init_population(problem.init, schedule, jax.random.PRNGKey(0), 1, 1,
                                antithetic=False, stagger=False)
  member = jax.tree.map(lambda a: a[0], pop)
  theta = {**trainer.warm_theta, "log_lr": trainer.warm_theta["log_lr"] + 4.0}  # lr ~0.05
  # Jitted once each: eagerly, every call of truncate traces and compiles its scan anew.
  _, log_mean, _ = jax.jit(lambda m: unroll.truncate(problem, 20, 3.0, theta, m,
                                                     log_loss=True))(member)
  one_step = jax.jit(lambda m: unroll.truncate(problem, 1, 3.0, theta, m))
  terms, m = [], member
  for _ in range(20):
    m, linear, _ = one_step(m)
    terms.append(float(linear))
  assert max(terms) > 2 * min(terms)  # the loss moved, so the two objectives differ
  np.testing.assert_allclose(float(log_mean), np.mean(np.log(terms)), rtol=1e-5)
  with pytest.raises(ValueError, match="meta_objective"):
    MetaConfig(meta_objective="log10")


def test_validation_suite_is_disjoint_from_training_and_heldout():
  names = lambda suite: {tasks.build(e.config, 10).name for e in tasks.get_suite(suite)}
  validation = names("validation")
  assert len(validation) == 5
  assert not validation & (names("heldout") | names("meta_train_default"))


def test_score_thetas_ranks_a_faster_theta_better():
  from metaopt.meta import validation
  trainer = MetaTrainer(TINY)
  slow = trainer.warm_theta
  fast = {**slow, "log_lr": slow["log_lr"] + 3.0}  # muAdamW lr 2e-2 instead of 1e-3
  entries = [tasks.SuiteEntry(QUADRATIC, 40, 0.0)]
  scores = validation.score_thetas(trainer.lo_config, {"slow": slow, "fast": fast},
                                   entries)
  (row,) = scores.values()
  assert row["fast"] < row["slow"] - 0.1, row


def test_score_and_export_flags_fail_clearly(tmp_path, capsys):
  import meta_train
  assert meta_train.main(["--score", "1,x", "--out", str(tmp_path)]) == 2
  assert "comma-separated outer steps" in capsys.readouterr().err
  assert meta_train.main(["--score", "5"]) == 2
  assert "--score needs --out" in capsys.readouterr().err
  assert meta_train.main(["--export", "5"]) == 2
  assert "--export needs --out" in capsys.readouterr().err
