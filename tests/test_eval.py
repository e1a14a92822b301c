"""Evaluation harness: the lr sweep picks the known best step, divergence is counted."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metaopt
import tasks
from metaopt import anchors
from metaopt import optimizers
from metaopt.eval import baselines, cache, harness, metrics, plan, summary, sweep

DIM = 8


def _quadratic_task(num_steps=10):
  """0.5/DIM * ||x - x*||^2, no noise: plain SGD converges in one step at lr = DIM."""
  return tasks.build(tasks.QuadraticConfig(dim=DIM, condition_number=1.0, rotate=False,
                                           noise_std=0.0), num_steps)


def _evaluation(tmp_path, **config):
  return harness.Evaluation(harness.EvalConfig(suite="smoke", **config),
                            cache.RunCache(tmp_path))


def test_lr_sweep_picks_the_known_optimal_step(tmp_path):
  task = _quadratic_task()
  # Grid DIM * {0.32, 0.56, 1, 1.8, 3.2}: at 1 the first step lands on x*; 3.2 diverges.
  spec = baselines.tuned("sgd", center=DIM, grid_size=5, span_decades=1.0,
                         schedules=("constant",))
  assert spec.source == "optax.sgd" and DIM in spec.lrs
  ev = _evaluation(tmp_path, seeds=2, tune_seeds=1, finalists=2)
  records = ev.run_job(harness.Job(task.name, None, spec), task)
  assert len(records) == 5 + 2  # grid on seed 0, two finalists on seed 1
  best = summary.chosen_settings(summary.setting_stats(records))[(task.name, "sgd")]
  assert best.lr == DIM and best.seeds == 2 and best.final_mean < 1e-10
  by_lr = {r["lr"]: r for r in records if r["seed"] == 0}
  assert by_lr[max(spec.lrs)]["diverged"] and not by_lr[DIM]["diverged"]


def test_divergence_is_counted_not_averaged(tmp_path):
  task = _quadratic_task()
  spec = dataclasses.replace(baselines.tuned("sgd", schedules=("constant",)),
                             lrs=(1e4 * DIM,))  # blows up
  records = _evaluation(tmp_path, seeds=2).run_job(harness.Job(task.name, None, spec), task)
  assert all(r["diverged"] for r in records)
  (stats,) = summary.setting_stats(records)
  assert stats.diverged == 2 and math.isnan(stats.final_mean)
  # Mixed seeds: the diverged seed is excluded from the mean and reported as a count.
  mixed = [dict(records[0], seed=s, final_loss=v, diverged=d, curve=[v] * 3)
           for s, (v, d) in enumerate([(1.0, False), (math.nan, True), (2.0, False)])]
  (stats,) = summary.setting_stats(mixed)
  assert (stats.seeds, stats.diverged, stats.final_mean) == (3, 1, 1.5)
  assert math.isnan(summary.reported_loss(stats))  # compared as diverged
  assert np.isfinite(stats.curve).all()


def test_cache_resumes_without_recomputing(tmp_path):
  task = _quadratic_task()
  spec = baselines.tuned("sgd", center=DIM, grid_size=2, span_decades=0.5,
                         schedules=("constant",))
  first = _evaluation(tmp_path, seeds=2, tune_seeds=2)
  records = first.run_job(harness.Job(task.name, None, spec), task)
  assert first.computed == len(records) == 4
  files = cache.RunCache(tmp_path).files()
  for f in files[::2]:
    f.unlink()
  again = _evaluation(tmp_path, seeds=2, tune_seeds=2)
  records2 = again.run_job(harness.Job(task.name, None, spec), task)
  assert again.computed == len(files[::2])
  np.testing.assert_allclose([r["final_loss"] for r in records2],
                             [r["final_loss"] for r in records], rtol=1e-5)


def test_metric_definitions():
  losses = np.concatenate([np.full(95, 3.0), np.full(5, 1.0)])
  assert metrics.final_loss(losses) == 1.0
  assert not metrics.diverged(losses)
  assert metrics.diverged(np.array([1.0, np.nan, 0.5]))
  assert metrics.diverged(np.array([1.0, 2.0, 2.0]))  # ends above the initial loss
  assert metrics.outcome(0.995, 1.0) == "tie" and metrics.outcome(0.9, 1.0) == "win"
  assert metrics.outcome(math.nan, 1.0) == "loss" and metrics.outcome(1.0, math.nan) == "win"
  steps = np.arange(1, 11) * 10
  fast, slow = np.linspace(1, 0.1, 10), np.linspace(1, 0.5, 10)
  # fast reaches slow's final 0.5 at step 60; slow never reaches fast's final 0.1.
  assert metrics.speedup(steps, fast, 0.1, slow, 0.5, 100) == 100 / 60
  assert metrics.speedup(steps, slow, 0.5, fast, 0.1, 100) == 60 / 100
  np.testing.assert_array_equal(metrics.ranks([2.0, math.nan, 1.0, 2.0]), [2.5, 4, 1, 2.5])


def test_lr_grid_and_setting_choice():
  assert sweep.lr_grid(10 ** -2.5) == (1e-4, 3.162e-4, 1e-3, 3.162e-3, 1e-2, 3.162e-2, 0.1)
  assert sweep.best_setting([("a", 0.5, 0.1), ("b", 0.0, 0.3), ("c", 0.0, math.nan)]) == "b"
  assert sweep.on_grid_edge(0.1, sweep.lr_grid(10 ** -2.5))


def test_unknown_names_list_valid_ones():
  with pytest.raises(ValueError, match="valid names: .*adamw.*prodigy"):
    baselines.resolve("adamw2")
  with pytest.raises(ValueError, match="has no default learning rate"):
    baselines.untuned("sgdm")
  with pytest.raises(ValueError, match="unknown schedule"):
    baselines.tuned("adamw", schedules=("cosine",))


def _hidden_mlp_task(num_steps=30):
  """Digits MLP 64 -> 32 -> 32 -> 10: one hidden 32 x 32 matrix for Muon."""
  return tasks.build(tasks.MLPConfig(tasks.DigitsData(), width=32, depth=2, batch_size=32),
                     num_steps)


def test_tuned_muon_is_ours_on_the_task_roles(tmp_path):
  spec = baselines.tuned("muon", grid_size=2, span_decades=1.0)
  assert spec.source == "metaopt.optimizers.muon"
  assert spec.schedules == sweep.SCHEDULE_NAMES and spec.lrs == sweep.lr_grid(1e-2, 2, 1.0)
  assert baselines.tuned("optax.contrib.muon").source == "optax.contrib.muon"
  task = _hidden_mlp_task()
  shapes = jax.eval_shape(task.init, jax.random.key(0))
  labels = jax.tree.leaves(optimizers.muon_labels(shapes, roles=task.roles))
  assert labels.count("muon") == 1 and labels.count("adam") == len(labels) - 1
  spec = dataclasses.replace(spec, schedules=("warmup_cosine",))  # one compile
  records = _evaluation(tmp_path, seeds=1).run_job(harness.Job(task.name, None, spec), task)
  assert len(records) == 2
  assert not any(r["diverged"] for r in records)
  assert all(r["final_loss"] < r["initial_loss"] for r in records)


def test_estimate_prices_muons_newton_schulz_matmuls():
  task = _hidden_mlp_task()
  ns = harness.newton_schulz_seconds_per_step(task, baselines.tuned("muon"))
  assert ns == 5 * 3 * 32 ** 3 * tasks.cost.S_PER_MAC  # one 32 x 32 view
  # optax's default also orthogonalizes the 64 x 32 input and 32 x 10 readout matrices.
  ns_optax = harness.newton_schulz_seconds_per_step(task, baselines.tuned("optax.contrib.muon"))
  assert ns_optax == ns + 5 * ((2 * 32 ** 2 * 64 + 32 ** 3) + (2 * 10 ** 2 * 32 + 10 ** 3)
                               ) * tasks.cost.S_PER_MAC
  assert harness.newton_schulz_seconds_per_step(task, baselines.tuned("adamw")) == 0.0


def test_plan_two_stage_counts_and_padding():
  config = harness.EvalConfig(suite="smoke", seeds=3, tune_seeds=1, finalists=3)
  grid = baselines.tuned("sgd", center=DIM, grid_size=5, span_decades=1.0,
                         schedules=("constant",))
  p = plan.optimizer_plan(config, grid)
  assert [pt.seed for pt in p.first_points] == [0] * 5 and p.first_stage == "sweep"
  assert (p.finalists, p.confirm_seeds, p.runs) == (3, (1, 2), 5 + 3 * 2)
  assert p.pad_to(6, run_cost_s=0.1) is None  # the confirmation stage outgrows the sweep
  assert p.pad_to(3, run_cost_s=0.1) == 5 and p.pad_to(3, run_cost_s=10.0) is None
  one = plan.optimizer_plan(config, baselines.untuned("adamw"))
  assert (one.first_stage, one.runs, one.confirm_runs) == ("run", 3, 0)
  whole = plan.plan(config, [grid, baselines.untuned("adamw")])
  assert [j.spec.label for j in whole.jobs[:2]] == ["sgd", "adamw (default)"]
  assert whole.total_runs == 2 * (11 + 3) and whole.runs_per_task == 14


def test_eval_runs_is_the_default_plan():
  # lo on 3 seeds; adamw, lion, schedule_free_adamw: 7 lrs x 2 schedules on seed 0 and 3
  # finalists on seeds 1-2; 7 untuned baselines (2 anchors) on 3 seeds.
  assert harness.default_eval_runs() == 3 + 3 * (14 + 3 * 2) + 7 * 3
  config = harness.EvalConfig()
  assert harness.default_eval_runs() == plan.plan(
      config, harness.specs(config, metaopt.pretrained())).runs_per_task


def test_widths_suite_runs_mup_optimizers_on_mup_networks():
  lo = metaopt.pretrained()
  config = harness.EvalConfig.for_suite("widths", widths=(64,))
  specs = harness.specs(config, lo, sp_lo=lo)
  on = {j.spec.label: j.entry.name for j in harness.jobs(config, specs)}
  assert on["lo"].endswith("_mup") and on["mu_adamw"].endswith("_mup")
  assert on["lo-sp"].endswith("_sp") and on["adamw"].endswith("_sp")
  mu = next(s for s in specs if s.label == "mu_adamw")
  task = tasks.widths_suite((64,), mup=True)[0].build()
  params = task.init(jax.random.key(0))
  opt = mu.make(1e-3, task)  # given the task's roles
  opt.update(jax.tree.map(np.ones_like, params), opt.init(params), params)


def test_anchors_are_untuned_at_their_peak_lr_and_schedule():
  """muon_default is optax.contrib.muon at anchors.MUON_LR with warmup + cosine: the
  spec's transform gives the same updates as metaopt.anchors.muon on a small tree."""
  spec = baselines.untuned("muon_default")
  assert (spec.kind, spec.lrs, spec.schedules) == (
      "untuned", (anchors.MUON_LR,), ("warmup_cosine",))
  assert "muon_default" in baselines.DEFAULT_UNTUNED and "muon_default" in (
      baselines.valid_names())
  num_steps = 20
  shape = sweep.schedule_shape("warmup_cosine", num_steps, anchors.WARMUP_FRACTION)
  ours = spec.make(lambda c: spec.lrs[0] * shape(c), None)
  ref = anchors.muon(num_steps)
  params = {"w": jnp.linspace(-1, 1, 12).reshape(3, 4), "b": jnp.ones(4)}
  s1, s2 = ours.init(params), ref.init(params)
  for _ in range(3):
    grads = jax.tree.map(lambda p: jnp.sin(p) + 0.1, params)
    u1, s1 = ours.update(grads, s1, params)
    u2, s2 = ref.update(grads, s2, params)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
      np.testing.assert_array_equal(a, b)
    params = optax.apply_updates(params, u1)
  assert float(jnp.abs(u1["w"]).max()) > 0

