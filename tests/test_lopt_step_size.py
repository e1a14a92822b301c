"""The learned optimizer's step-size features (``LOConfig.step_size_features``).

The switch off changes nothing (config JSON, state leaves, updates); on with zero new
weights it gives the updates of the LO without it, in both layouts, with and without
``value=``; each feature equals a NumPy float64 transcription of its equation (the
features are read off the engine's updates through a theta that makes the update
``-(C + feature)``); a nonzero weight on a new row changes the updates; ``init`` runs
under ``jax.eval_shape``; a skipped step leaves the new state unchanged.

One compiled step per (config, layout, value given): theta and the loss are arguments.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaopt.lopt import FEATURE_NAMES, LOConfig, LearnedOptimizer
from metaopt.lopt import _update
from metaopt.lopt._config import STEP_SIZE_FEATURES

NUM_STEPS = 10


def _tree(flat=True):
  """Scalar, vectors (one zero-initialized: the distance's guard), matrix, conv kernel.
  The per-tensor layout compiles each shape's programs apart: it gets the tree
  without the matrix (the conv kernel is the rank >= 2 case)."""
  k = jax.random.split(jax.random.key(0), 3)
  tree = {"scalar": jnp.asarray(0.3), "vector": jax.random.normal(k[0], (7,)),
          "bias": jnp.zeros((7,)), "matrix": jax.random.normal(k[1], (6, 4)) * 0.1,
          "conv": jax.random.normal(k[2], (3, 3, 2, 4)) * 0.1}
  if not flat:
    del tree["matrix"]
  return tree


def _grads(params, t):
  return jax.tree.map(lambda p: jnp.sin((t + 1) * jnp.arange(p.size, dtype=jnp.float32)
                                        .reshape(p.shape) + 0.3 * p + 0.2), params)


def _loss(t):
  return np.float32(2.0 / (t + 1) + 0.1 * (t % 2))  # falling, not monotonically


_STEPS = {}  # (config, flat, value given) -> jitted step(theta, grads, state, params, loss)


def _step(lo, flat, with_value):
  key = (lo.config, flat, with_value)
  if key not in _STEPS:
    def step(theta, g, s, p, loss):
      opt = lo.with_theta(theta).as_optax(num_steps=NUM_STEPS, sp=True)
      return opt.update(g, s, p, value=loss if with_value else None)
    _STEPS[key] = jax.jit(step)
  return _STEPS[key]


def _init(lo, params, flat):
  state = _update.init_state(params, jax.tree.map(lambda _: 1.0, params), lo.config,
                             flat=None if flat else False)
  assert _update.is_flat(state) == flat
  return state


def _trajectory(lo, flat, with_value, steps=4):
  """(updates, states, params) of ``steps`` steps of ``lo`` on its own trajectory:
  ``states[t]`` and ``params[t]`` are before step t + 1."""
  params = [_tree(flat)]
  states, updates = [_init(lo, params[0], flat)], []
  step = _step(lo, flat, with_value)
  for t in range(steps):
    u, s = step(lo.theta, _grads(params[-1], t), states[-1], params[-1], _loss(t))
    updates.append(u)
    states.append(s)
    params.append(jax.tree.map(lambda p, d: p + d, params[-1], u))
  return updates, states, params


def _base():
  """A random LO (nonzero output layer); two hidden units keep compiles short."""
  return LearnedOptimizer.random(jax.random.key(1), LOConfig(hidden_size=2),
                                 output_scale=0.3)


def _assert_close(a_tree, b_tree, scale=1e-6):
  for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)):
    a, b = np.asarray(a), np.asarray(b)
    atol = scale * max(float(np.max(np.abs(a))), 1e-30)
    np.testing.assert_allclose(b, a, rtol=0, atol=atol)


def test_switch_off_config_json_and_state_unchanged():
  """Off (the default): the JSON has no step-size field (every existing artifact reads
  and writes as before), the feature rows are the old ones and the state holds no new
  leaf."""
  config = LOConfig()
  d = config.to_dict()
  assert "step_size_features" not in d and "loss_trend_decay" not in d
  assert config.feature_names == FEATURE_NAMES
  assert LOConfig.from_dict(json.loads(config.to_json())) == config
  state = jax.eval_shape(lambda p: _init(_base(), p, True), _tree())
  assert state.initial_params is None and state.loss_ema_slow is None
  on = LOConfig(step_size_features=True, loss_trend_decay=0.95)
  assert on.to_dict()["step_size_features"] is True
  assert LOConfig.from_dict(json.loads(on.to_json())) == on
  first = len(FEATURE_NAMES) + on.muon  # after the muon feature, when there is one
  assert on.feature_names[first:] == STEP_SIZE_FEATURES
  both = LOConfig(muon=True, step_size_features=True)
  assert both.feature_names[-4:] == ("muon",) + STEP_SIZE_FEATURES
  for bad in ("yes", 1):
    with pytest.raises(ValueError, match="step_size_features"):
      LOConfig(step_size_features=bad)
  with pytest.raises(ValueError, match="loss_trend_decay"):
    LOConfig(loss_trend_decay=1.0)


def test_extended_adds_zero_rows_by_name_and_is_idempotent():
  lo = _base()
  on = lo.extended(step_size_features=True)
  assert on.config == dataclasses.replace(lo.config, step_size_features=True)
  w1 = np.asarray(on.theta["w1"])
  np.testing.assert_array_equal(w1[:len(FEATURE_NAMES)], lo.theta["w1"])
  np.testing.assert_array_equal(w1[len(FEATURE_NAMES):], 0)
  np.testing.assert_array_equal(on.theta["mix"], lo.theta["mix"])
  both = on.extended(muon=True)  # the muon row goes before the step-size rows
  names = both.config.feature_names
  for name in lo.config.feature_names + STEP_SIZE_FEATURES:
    np.testing.assert_array_equal(both.theta["w1"][names.index(name)],
                                  on.theta["w1"][on.config.feature_names.index(name)])
  np.testing.assert_array_equal(both.theta["w1"][names.index("muon")], 0)
  np.testing.assert_array_equal(both.theta["hidden_mix"], 0)
  again = both.extended(muon=True, step_size_features=True)
  assert again.config == both.config
  for k in both.theta:
    np.testing.assert_array_equal(again.theta[k], both.theta[k])
  assert lo.extended().config == lo.config


# Fast: each layout once and each value mode once; the crossed pairs run with the slow
# tests (two more compiled programs each).
@pytest.mark.parametrize("flat, with_value", [
    (True, True), (False, False),
    pytest.param(True, False, marks=pytest.mark.slow),
    pytest.param(False, True, marks=pytest.mark.slow)])
def test_switch_with_zero_new_weights_equals_the_lo_without_it(flat, with_value):
  """Same layout, same sums (three more operands in the statistics reduction, three
  more zero-weighted rows in the hidden bias): the updates agree to float32 rounding
  (measured: bitwise on XLA:CPU)."""
  lo = _base()
  off, _, _ = _trajectory(lo, flat, with_value)
  on, states, _ = _trajectory(lo.extended(step_size_features=True), flat, with_value)
  _assert_close(off, on)
  assert states[-1].initial_params is not None and _update.is_flat(states[-1]) == flat


# The reading theta: mix 0, log_lr 0, one hidden unit with bias C > max |feature| and
# weight 1 on the read row, output d = hidden, log-magnitude 0: update = -(C + feature)
# on every element of a tensor (sp, learning_rate 1, no horizon decay).
_C = 3.0


def _reading_theta(config, row):
  h = config.hidden_size
  return {"log_lr": jnp.float32(0.0), "mix": jnp.zeros(len(config.candidate_names)),
          "w1": jnp.zeros((config.num_features, h)).at[row, 0].set(1.0),
          "b1": jnp.zeros(h).at[0].set(_C), "w2": jnp.zeros((h, 2)).at[0, 0].set(1.0),
          "b2": jnp.zeros(2)}


def _reference_features(params, grads, x0, t, loss_values, config):
  """NumPy float64: every tensor's (log_distance, displacement_cosine, loss_trend)
  at step t (1-based) from x_t = params (before the step), x_0, the gradients g_1..g_t
  and the losses f_1..f_t (None: no value given)."""
  b_fast = config.momentum_decays[0]
  b_slow = config.loss_trend_decay
  out = {}
  trend = 0.0
  if loss_values is not None:
    fast = slow = 0.0
    for f in loss_values:
      fast = b_fast * fast + (1 - b_fast) * float(f)
      slow = b_slow * slow + (1 - b_slow) * float(f)
    fast, slow = fast / (1 - b_fast**t), slow / (1 - b_slow**t)
    trend = (fast - slow) / (abs(fast) + abs(slow))
  for name in params:
    x = np.asarray(params[name], np.float64).ravel()
    x_init = np.asarray(x0[name], np.float64).ravel()
    m = np.zeros_like(x)
    for g in grads:
      m = b_fast * m + (1 - b_fast) * np.asarray(g[name], np.float64).ravel()
    disp = x - x_init
    # RMS(x - x_0) / max(RMS(x_0), RMS(x)); 0 for a zero tensor that has not moved.
    ref = max(np.sqrt(np.mean(x_init**2)), np.sqrt(np.mean(x**2)))
    ratio = np.sqrt(np.mean(disp**2)) / ref if ref > 0 else 0.0
    # cos(m_fast, x_0 - x); 0 while the displacement is 0.
    norms = np.linalg.norm(m) * np.linalg.norm(disp)
    cosine = float(np.dot(m, -disp) / norms) if norms > 0 else 0.0
    out[name] = (np.log10(ratio + 1e-8) / 4, cosine, trend)
  return out


@pytest.mark.parametrize("flat, with_value", [(True, True), (False, False)])
def test_features_match_their_equations_in_float64(flat, with_value):
  """After 3 steps of an LO with nonzero step-size weights, and at step 1 (finite,
  x = x_0), each feature of each tensor (scalar, vectors, zero-initialized bias,
  matrix, conv kernel) as the engine computes it matches the float64 equation.
  Tolerance 3e-6: float32 rounding of C + feature (C = 3) and of the float32 sums."""
  lo = _base().extended(step_size_features=True)
  config = lo.config
  rows = [config.feature_names.index(n) for n in STEP_SIZE_FEATURES]
  theta = dict(lo.theta)
  theta["w1"] = theta["w1"].at[np.asarray(rows)].set(0.5)
  lo = lo.with_theta(theta)
  steps = 3
  _, states, params = _trajectory(lo, flat, with_value, steps=steps)
  grads = [_grads(params[t], t) for t in range(steps + 1)]
  losses = [_loss(t) for t in range(steps + 1)]
  step = _step(lo, flat, with_value)
  for t in (0, steps):  # read at step t + 1
    want = _reference_features(params[t], grads[:t + 1], params[0], t + 1,
                               losses[:t + 1] if with_value else None, config)
    for k, row in enumerate(rows):
      u, _ = step(_reading_theta(config, row), grads[t], states[t], params[t], losses[t])
      for name, leaf in u.items():
        got = -np.asarray(leaf, np.float64) - _C
        np.testing.assert_allclose(got, want[name][k], rtol=0, atol=3e-6,
                                   err_msg=f"{STEP_SIZE_FEATURES[k]} {name} step {t + 1}")
    if t == 0:  # not moved yet: finite, at the bottom of the distance's range
      assert all(np.isclose(w[0], -2.0) and w[1] == 0.0 for w in want.values())
  print({name: np.round(w, 3) for name, w in want.items()})
  assert abs(want["bias"][0]) < 1e-8  # a zero-initialized tensor moved by its own size


def test_step_size_sums_match_the_per_leaf_functions():
  """The engine's per-tensor feature function (sums in) against the per-leaf
  reference functions of metaopt.features (arrays in)."""
  from metaopt import features as F  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  x0 = rng.normal(size=(4, 9)).astype(np.float32)
  x = x0 + 0.1 * rng.normal(size=(4, 9)).astype(np.float32)
  m = rng.normal(size=(4, 9)).astype(np.float32)
  sq = lambda a: np.sum(np.square(a), axis=1)
  got = jax.jit(_update.step_size_features)(sq(x - x0), sq(x0), sq(x),
                                            np.sum(m * (x0 - x), 1), sq(m),
                                            np.float32(0.25))
  for i in range(4):
    np.testing.assert_allclose(got[i, 0], F.log_distance(F.distance_ratio(x[i], x0[i])),
                               rtol=1e-6)
    np.testing.assert_allclose(got[i, 1], F.torque_cosine(m[i], x0[i] - x[i]), rtol=1e-5)
  np.testing.assert_array_equal(got[:, 2], 0.25)
  np.testing.assert_allclose(F.loss_trend(2.0, 1.0), 1 / 3)
  np.testing.assert_allclose(F.loss_trend(-2.0, -1.0), -1 / 3)
  assert float(F.loss_trend(0.0, 0.0)) == 0.0
  assert float(F.distance_ratio(jnp.zeros(3), jnp.zeros(3))) == 0.0


def test_nonzero_weight_on_each_new_row_changes_the_updates():
  lo = _base().extended(step_size_features=True)
  before = _trajectory(lo, True, True, steps=3)[0][-1]
  for name in STEP_SIZE_FEATURES:
    row = lo.config.feature_names.index(name)
    theta = {**lo.theta, "w1": lo.theta["w1"].at[row].set(1.0)}
    after = _trajectory(lo.with_theta(theta), True, True, steps=3)[0][-1]
    for leaf in before:
      assert not np.array_equal(np.asarray(after[leaf]), np.asarray(before[leaf])), (
          name, leaf)


def test_init_under_eval_shape_and_x0_is_a_copy_of_the_params():
  lo = _base().extended(step_size_features=True)
  opt = lo.as_optax(num_steps=NUM_STEPS, sp=True)
  params = _tree()
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
  shapes = jax.eval_shape(opt.init, abstract)
  state = opt.init(params)
  assert jax.tree.structure(shapes) == jax.tree.structure(state)
  assert [(a.shape, a.dtype) for a in jax.tree.leaves(shapes)] == [
      (a.shape, a.dtype) for a in jax.tree.leaves(state)]
  per_tensor = _init(lo, params, False)
  for name, p in params.items():
    np.testing.assert_array_equal(per_tensor.initial_params[name], p)
    assert per_tensor.initial_params[name] is not p  # a copy: params may be donated
  assert state.initial_params.flat.shape == state.second_moment.flat.shape
  assert float(state.loss_ema_slow) == 0.0


def test_skipped_step_leaves_the_new_state_unchanged():
  lo = _base().extended(step_size_features=True)
  _, states, params = _trajectory(lo, True, True, steps=2)
  step = _step(lo, True, True)
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), _grads(params[-1], 2))
  for grads, loss in ((bad, _loss(2)), (_grads(params[-1], 2), np.float32(np.nan))):
    u, s = step(lo.theta, grads, states[-1], params[-1], loss)
    assert int(s.num_nonfinite) == 1 and all(
        not np.any(np.asarray(a)) for a in jax.tree.leaves(u))
    for a, b in zip(jax.tree.leaves((s.initial_params, s.loss_ema_slow, s.loss_ema)),
                    jax.tree.leaves((states[-1].initial_params, states[-1].loss_ema_slow,
                                     states[-1].loss_ema))):
      np.testing.assert_array_equal(a, b)
  assert float(states[-1].loss_ema_slow) != 0.0


def test_state_made_for_another_config_is_a_clear_error():
  params = _tree()
  lo = _base()
  with pytest.raises(ValueError, match="step_size_features"):
    _update.update(lo.extended(step_size_features=True).config, lo.theta,
                   _grads(params, 0), _init(lo, params, True), params)


def test_meta_training_turns_the_switches_on_in_the_warm_start_and_a_resume_keeps_them():
  """``MetaConfig.step_size_features`` / ``muon`` extend the warm start (zero new
  weights); neither is resumable: a resumed run with a changed switch is refused."""
  from metaopt.meta import checkpointing, outer  # pylint: disable=g-import-not-at-top
  from metaopt.meta.config import MetaConfig  # pylint: disable=g-import-not-at-top
  plain = outer.warm_start(MetaConfig())
  lo = outer.warm_start(MetaConfig(step_size_features=True, muon=True))
  assert lo.config == dataclasses.replace(plain.config, step_size_features=True, muon=True)
  want = plain.extended(muon=True, step_size_features=True).theta
  for k in want:
    np.testing.assert_array_equal(lo.theta[k], want[k])
  assert lo.config.to_dict()["step_size_features"] is True  # what an export records
  for name in ("step_size_features", "muon"):
    assert name not in checkpointing.RESUMABLE_FIELDS
    on = MetaConfig(**{name: True})
    assert checkpointing.fields_differ(MetaConfig(), on) == [name]
    saved = checkpointing.run_metadata(MetaConfig(), plain.config, ["t"])
    run = checkpointing.run_metadata(on, lo.config, ["t"])
    with pytest.raises(checkpointing.CheckpointError, match=name):
      checkpointing.check_metadata(saved, run, "ckpt")
  with pytest.raises(ValueError, match="step_size_features"):
    MetaConfig(step_size_features="true")
