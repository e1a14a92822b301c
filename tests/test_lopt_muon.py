"""The learned optimizer's orthogonalized-momentum candidate (``LOConfig.muon``).

Exact subsumption of Muon (Jordan et al, "Muon: An optimizer for hidden layers in neural
networks", 2024) on a Flax and a Haiku tree in float64, the switch's state and theta
layout, the candidate and feature on hidden matrices only, and old artifacts unchanged.
"""

import functools
import warnings

import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metaopt
from metaopt import checkpoint
from metaopt import mup
from metaopt import optimizers
from metaopt.lopt import FEATURE_NAMES, LOConfig, LearnedOptimizer
from metaopt.lopt import _update

from _old_artifact_updates import BEFORE_MUON, released_updates
from test_lopt import _run_both

GOLDEN = "tests/data/released_lo_updates.npz"


class _FlaxConvMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = nn.relu(nn.Conv(6, (3, 3))(x)).reshape(x.shape[0], -1)
    x = nn.tanh(nn.Dense(16)(x))
    x = nn.tanh(nn.Dense(12)(x))
    return nn.Dense(3)(x)


def _flax_problem(dtype):
  """Flax conv + MLP; roles by labels (first conv input, readout output, vectors)."""
  model = _FlaxConvMLP()
  x = jax.random.normal(jax.random.key(1), (8, 5, 5, 2), dtype)
  y = jax.random.normal(jax.random.key(2), (8, 3), dtype)
  params = jax.tree.map(lambda a: a.astype(dtype),
                        model.init(jax.random.key(3), x)["params"])
  labels = {k: {"kernel": role, "bias": "vector"} for k, role in (
      ("Conv_0", "input"), ("Conv_1", "hidden"), ("Dense_0", "hidden"),
      ("Dense_1", "hidden"), ("Dense_2", "output"))}

  def loss(p, key):
    xb = x + 0.1 * jax.random.normal(key, x.shape, dtype)
    return 0.5 * jnp.mean((model.apply({"params": p}, xb) - y) ** 2)

  return params, loss, {"labels": labels}


def _haiku_model(x):
  x = jax.nn.relu(hk.Conv2D(4, 3)(x))
  x = jax.nn.relu(hk.Conv2D(4, 3)(x)).reshape(x.shape[0], -1)
  return hk.nets.MLP([16, 16, 3], activation=jnp.tanh)(x)


def _haiku_problem(dtype):
  """Haiku convs + MLP; roles inferred (the unlabeled user tree)."""
  model = hk.without_apply_rng(hk.transform(_haiku_model))
  x = jax.random.normal(jax.random.key(4), (8, 5, 5, 2), dtype)
  y = jax.random.normal(jax.random.key(5), (8, 3), dtype)
  params = jax.tree.map(lambda a: a.astype(dtype), model.init(jax.random.key(6), x))

  def loss(p, key):
    xb = x + 0.1 * jax.random.normal(key, x.shape, dtype)
    return 0.5 * jnp.mean((model.apply(p, xb) - y) ** 2)

  return params, loss, {}


PROBLEMS = {"flax": _flax_problem, "haiku": _haiku_problem}
MUON_CASES = {
    "defaults": {"learning_rate": 0.02},
    "decays, adam lr, beta shared with adam_b1": {
        "learning_rate": 0.01, "beta": 0.9, "weight_decay": 0.1,
        "adam_weight_decay": 0.02, "adam_learning_rate": 3e-3, "ns_steps": 4},
}


# Fast: each problem once and each case once; the crossed pairs run with the slow tests.
_SLOW = pytest.mark.slow
@pytest.mark.parametrize("problem, case", [
    ("flax", "defaults"), ("haiku", "decays, adam lr, beta shared with adam_b1"),
    pytest.param("haiku", "defaults", marks=_SLOW),
    pytest.param("flax", "decays, adam lr, beta shared with adam_b1", marks=_SLOW)])
def test_from_classical_muon_equals_muon_float64(x64, problem, case):
  """100 steps on the optimizer's own trajectory, updates within rtol 1e-8.

  Float64 rounding is ~1e-16 per operation; Newton-Schulz's quintic map amplifies it by
  at most a^5 ~ 500 along small singular directions, and the LO computes Adam's
  quotient as a product with a reciprocal and exp(log(lr)) for lr. Measured: ~1e-14 of
  each tensor's largest entry, <= 2.4e-9 relative on the smallest entries (near-zero
  sums), inside rtol 1e-8; a wrong split or momentum is O(1) off.
  """
  del x64
  params, loss, roles = PROBLEMS[problem](jnp.float64)
  hparams = MUON_CASES[case]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", mup.RoleInferenceWarning)
    which = optimizers.muon_labels(params, **roles)
    ref = optimizers.muon(**hparams, **roles)
    lo = LearnedOptimizer.from_classical("muon", **hparams)
    u_ref, u_lo = _run_both(ref, lo.as_optax(**roles), params, loss, 100, False)
  assert {"muon", "adam"} <= set(jax.tree.leaves(which))  # both parts are exercised
  assert any(l == "muon" and p.ndim == 4 for l, p in zip(jax.tree.leaves(which),
                                                        jax.tree.leaves(params)))
  assert lo.config.muon and (lo.config.muon_momentum == 3) == ("beta" not in hparams)
  for a, b in zip(jax.tree.leaves(u_ref), jax.tree.leaves(u_lo)):
    assert a.dtype == jnp.float64
    np.testing.assert_allclose(b, a, rtol=1e-8, atol=1e-14)
  assert float(jnp.max(jnp.abs(jax.tree.leaves(u_ref)[-1]))) > 0  # really trained


@pytest.mark.parametrize("hparams, bad", [
    ({"adaptive": True}, "adaptive"),
    ({"nesterov": False}, "nesterov"),
    ({"consistent_rms": 0.2}, "consistent_rms"),
    ({"mask": {"w": True}}, "mask"),
    ({"ns_coeffs": ((3.0, -4.0, 2.0),) * 5}, "ns_coeffs"),
])
def test_from_classical_muon_rejects_unrepresentable(hparams, bad):
  with pytest.raises(ValueError, match=bad):
    LearnedOptimizer.from_classical("muon", learning_rate=0.02, **hparams)


def _roles_tree():
  params = {"in": jnp.ones((5, 8)), "hidden": jnp.ones((8, 16)),
            "conv": jnp.ones((3, 3, 4, 6)), "bias": jnp.ones((16,)), "out": jnp.ones((16, 3))}
  roles = {"in": mup.input_role(5), "hidden": mup.hidden_role(8, 8),
           "conv": mup.hidden_role(36, 36), "bias": mup.vector_role(),
           "out": mup.output_role(16, 16)}
  return params, roles


def test_state_layout_unchanged_off_and_one_buffer_on_hidden_matrices_only():
  params, roles = _roles_tree()
  off = LearnedOptimizer.random(jax.random.key(0)).as_optax(roles=roles).init(params)
  shared = LearnedOptimizer.random(
      jax.random.key(0), LOConfig(muon=True, muon_beta=0.99)).as_optax(roles=roles)
  own = LearnedOptimizer.random(jax.random.key(0), LOConfig(muon=True)).as_optax(roles=roles)
  assert len(off.momenta) == 3
  shared_state = shared.init(params)
  assert len(shared_state.momenta) == 3  # Muon reads the momentum of its decay.
  # The matrices Muon orthogonalizes keep their own buffers (the others are flat).
  assert [a.shape for a in shared_state.second_moment.tensors] == [(3, 3, 4, 6), (8, 16)]
  assert off.second_moment.tensors == ()
  state = own.init(params)
  assert len(state.momenta) == 4
  assert {k: v.shape for k, v in state.momenta[3].items()} == {
      "in": (), "hidden": (8, 16), "conv": (3, 3, 4, 6), "bias": (), "out": ()}
  assert optimizers.muon_fan_ins(params, roles) == {
      "in": 0, "hidden": 8, "conv": 36, "bias": 0, "out": 0}


_STEPS = {}  # one compiled step per (config, tree, roles): theta is an argument.


def _updates(lo, params, roles, steps=4, value=True):
  opt = lo.as_optax(num_steps=10, roles=roles)
  key = (lo.config, jax.tree.structure(params), str(roles), value)
  if key not in _STEPS:
    _STEPS[key] = jax.jit(lambda theta, g, s, p: lo.with_theta(theta).as_optax(
        num_steps=10, roles=roles).update(g, s, p, value=jnp.float32(0.5) if value else None))
  step = functools.partial(_STEPS[key], lo.theta)
  state, out = opt.init(params), []
  for t in range(steps):
    grads = jax.tree.map(lambda p: jnp.sin((t + 1) * jnp.arange(p.size).reshape(p.shape)
                                           + 0.1 * p), params)
    updates, state = step(grads, state, params)
    out.append(updates)
  return out


def test_switch_with_zero_new_weights_equals_the_lo_without_it():
  """The new candidates, the hidden-matrix mix and the feature enter only through
  their weights: all zero, the LO is the one without the switch. Only float32
  rounding differs: with the switch the hidden matrices keep their own buffers, so
  their statistics are summed per tensor instead of as segment sums of the flat
  buffer (~1e-6 relative, carried through the MLP): 1e-5 of each update's scale."""
  params, roles = _roles_tree()
  lo = LearnedOptimizer.random(jax.random.key(1), output_scale=0.3)
  for a, b in zip(jax.tree.leaves(_updates(lo, params, roles)),
                  jax.tree.leaves(_updates(lo.extended(muon=True), params, roles))):
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * float(np.max(np.abs(a))))


def test_muon_feature_and_hidden_mix_act_on_hidden_matrices_only():
  params, roles = _roles_tree()
  base = LearnedOptimizer.random(jax.random.key(2), output_scale=0.3).extended(muon=True)
  row = base.config.feature_names.index("muon")
  assert row == len(FEATURE_NAMES)  # appended: the old rows keep their places
  k = base.config.candidate_names.index("muon")
  variants = {
      "feature": {**base.theta, "w1": base.theta["w1"].at[row].set(1.0)},
      "hidden_mix": {**base.theta, "hidden_mix": base.theta["hidden_mix"].at[k].set(0.5)},
      "mix": {**base.theta, "mix": base.theta["mix"].at[k].set(0.5)},
  }
  before = _updates(base, params, roles, steps=2)[-1]
  for name, theta in variants.items():
    after = _updates(base.with_theta(theta), params, roles, steps=2)[-1]
    for leaf in params:
      changed = not np.array_equal(np.asarray(after[leaf]), np.asarray(before[leaf]))
      assert changed == (leaf in ("hidden", "conv")), (name, leaf)


# Fast: each dtype once and each momentum case (own buffer, shared) once.
@pytest.mark.parametrize("dtype, beta", [
    (jnp.float32, 0.95), (jnp.bfloat16, 0.9),
    pytest.param(jnp.bfloat16, 0.95, marks=pytest.mark.slow),
    pytest.param(jnp.float32, 0.9, marks=pytest.mark.slow)])
def test_random_lo_with_switch_finite_and_keeps_dtypes(dtype, beta):
  params, roles = _roles_tree()
  params = jax.tree.map(lambda p: p.astype(dtype), params)
  lo = LearnedOptimizer.random(jax.random.key(3), LOConfig(muon=True, muon_beta=beta),
                               output_scale=0.1)
  theta = dict(lo.theta)
  theta["w1"] = theta["w1"].at[-1].set(1.0)
  theta["hidden_mix"] = theta["hidden_mix"].at[-2].set(1.0)
  for updates in _updates(lo.with_theta(theta), params, roles, value=beta == 0.9):
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
      assert u.dtype == dtype
      assert bool(jnp.all(jnp.isfinite(u.astype(jnp.float32))))
  assert float(jnp.max(jnp.abs(updates["hidden"].astype(jnp.float32)))) > 0


def test_switch_needs_the_fan_ins_when_called_directly():
  params, _ = _roles_tree()
  lo = LearnedOptimizer.random(jax.random.key(0), LOConfig(muon=True))
  with pytest.raises(ValueError, match="muon_fan_in"):
    _update.init_state(params, jax.tree.map(lambda _: 1.0, params), lo.config)
  with pytest.raises(ValueError, match="2-D view"):
    _update.init_state(params, jax.tree.map(lambda _: 1.0, params), lo.config,
                       {**jax.tree.map(lambda _: 0, params), "hidden": 7})


def test_released_artifacts_read_as_off_and_give_the_same_updates():
  """The artifacts released before the switch (0.2.0's, its SP LO) load with it off, with the
  theta and config they had, and give the updates the engine gave before the switch
  and the flat layout existed (tests/data/released_lo_updates.npz: written by
  tests/_old_artifact_updates.py at commit 902cba5, XLA:CPU), to float32 rounding.

  Tolerance: the per-tensor statistics are float32 sums whose order differs between
  CPUs and between the layouts (segment sums over 128-element rows vs a sum per
  tensor): ~1e-6 relative, carried through the features, the MLP and the exp of a
  clipped magnitude over six steps: 1e-5 of each update's scale. A changed feature,
  weight or layout offset moves updates by O(1) of their scale."""
  golden = np.load(GOLDEN)
  assert set(BEFORE_MUON) <= set(checkpoint.available())
  for name, key in BEFORE_MUON.items():
    lo = metaopt.pretrained(name)
    assert not lo.config.muon and "hidden_mix" not in lo.theta
    assert "muon" not in lo.config.to_dict()  # re-saved, the same JSON as before
    assert lo.config.feature_names == FEATURE_NAMES
    if jax.default_backend() != "cpu":
      continue
    new = released_updates(name, key)
    assert set(new) == {k for k in golden.files if k.startswith(key + "/")}
    for path, value in new.items():
      want = golden[path]
      np.testing.assert_allclose(value, want, rtol=0,
                                 atol=1e-5 * float(np.max(np.abs(want))), err_msg=path)


def test_artifact_with_switch_records_it_and_round_trips(tmp_path):
  params, roles = _roles_tree()
  lo = LearnedOptimizer.random(jax.random.key(4), LOConfig(muon=True, muon_ns_steps=3),
                               output_scale=0.2)
  lo = lo.with_theta({**lo.theta, "hidden_mix": jnp.linspace(-1, 1, 13)})
  path = checkpoint.save(lo, tmp_path / "muon")
  meta = checkpoint.read_metadata(path)
  assert meta["config"]["muon"] is True and meta["config"]["muon_ns_steps"] == 3
  assert meta["candidates"][-2:] == ["muon", "nadam"] and meta["features"][-1] == "muon"
  assert meta["theta_shapes"]["hidden_mix"] == [13]
  loaded = metaopt.load(path)
  assert loaded.config == lo.config
  for a, b in zip(jax.tree.leaves(_updates(lo, params, roles, steps=2)),
                  jax.tree.leaves(_updates(loaded, params, roles, steps=2))):
    np.testing.assert_array_equal(a, b)


def test_meta_training_inner_problem_runs_the_switch_with_the_tasks_roles():
  """Meta-training calls the engine directly: the task's roles give muon_fan_in."""
  import tasks  # pylint: disable=g-import-not-at-top
  from metaopt.meta.inner import lo_problem  # pylint: disable=g-import-not-at-top
  task = tasks.build(tasks.MLPConfig(data=tasks.GaussianMixtureData(), width=16, depth=2,
                                     batch_size=8))
  lo = LearnedOptimizer.random(jax.random.key(5), LOConfig(muon=True), output_scale=0.1)
  problem = lo_problem(task, lo.config)
  state = problem.init(jax.random.key(0))
  fan_in = optimizers.muon_fan_ins(task.param_shapes(), task.roles)
  hidden = [f for f in jax.tree.leaves(fan_in) if f]
  assert hidden and len(hidden) < len(jax.tree.leaves(fan_in))
  for buffer, f in zip(jax.tree.leaves(state.opt_state.momenta[3]), jax.tree.leaves(fan_in)):
    assert (buffer.ndim >= 2) == bool(f)
  step = jax.jit(lambda s, k: problem.step(lo.theta, s, k, 0, 60))
  for t in range(3):
    state, loss = step(state, jax.random.key(t + 1))
  assert bool(jnp.isfinite(loss))
  assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(state.params))
