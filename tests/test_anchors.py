"""The untuned anchors (Muon and AdamW at their defaults with warmup + cosine) and the
learned optimizer that equals Muon's (the prior of 0.3.0), in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metaopt import anchors
from metaopt.eval import sweep
from metaopt.lopt import LOConfig
from metaopt.lopt import _update

from test_lopt import _run_both
from test_lopt_muon import _flax_problem


@pytest.mark.parametrize("num_steps", [100, pytest.param(37, marks=pytest.mark.slow)])
def test_learned_prior_equals_muon_anchor_float64(x64, num_steps):
  """100 steps (warmup, the cosine and, for 37, 63 steps past the horizon): updates
  within rtol 1e-8 of ``optax.contrib.muon`` with the schedule.

  Same budget as the from_classical Muon parity test (Newton-Schulz amplifies float64
  rounding by at most a^5 ~ 500; the LO forms lr as exp(log lr)); a wrong split, a
  one-step shift of the schedule (0.05 of the step at the warmup's end) or a missing
  decay is O(1e-2) or more off. Past ``num_steps`` optax's schedule is 0 and the LO
  holds its last value: compared only up to the horizon.
  """
  del x64
  params, loss, _ = _flax_problem(jnp.float64)  # conv kernels (Adam) and 2-D (Muon)
  # anchors.muon(num_steps) with optax's schedule evaluated in float64 (given an int32
  # count it computes in float32, a 1e-7 relative difference that would hide the rest).
  shape = sweep.schedule_shape("warmup_cosine", num_steps, anchors.WARMUP_FRACTION)
  ref = optax.contrib.muon(
      learning_rate=lambda c: anchors.MUON_LR * shape(c.astype(jnp.float64)))
  lo = anchors.learned_prior()
  steps = min(num_steps, 100)
  u_ref, u_lo = _run_both(ref, lo.as_optax(num_steps=num_steps), params, loss, steps,
                          False)
  for path, a, b in zip(jax.tree_util.tree_flatten_with_path(u_ref)[0],
                        jax.tree.leaves(u_ref), jax.tree.leaves(u_lo)):
    assert a.dtype == jnp.float64, path
    np.testing.assert_allclose(b, a, rtol=1e-8, atol=1e-14, err_msg=str(path))
  assert float(jnp.max(jnp.abs(jax.tree.leaves(u_ref)[-1]))) > 0  # really trained


@pytest.mark.parametrize("num_steps, fraction", [(100, 0.05), (37, 0.05), (7, 0.3),
                                                 (2, 0.05), (50, 0.05)])
def test_warmup_cosine_multiplier_is_the_evaluation_schedule(x64, num_steps, fraction):
  """The LO's multiplier at step t (1-based) is the optax schedule at t - 1, and holds
  its last value past the horizon; the same with num_steps traced."""
  del x64
  shape = sweep.schedule_shape("warmup_cosine", num_steps, fraction)
  counts = jnp.arange(1, num_steps + 6, dtype=jnp.int32)
  got = jax.vmap(lambda c: _update.warmup_cosine_multiplier(c, num_steps, fraction))(
      counts)
  want = np.array([float(shape(jnp.float64(min(int(c) - 1, num_steps - 1))))
                   for c in counts])
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
  traced = jax.jit(lambda n: jax.vmap(
      lambda c: _update.warmup_cosine_multiplier(c, n, fraction))(counts))(
          jnp.asarray(num_steps))
  np.testing.assert_allclose(traced, want, rtol=1e-12, atol=1e-15)
  assert float(got[0]) == 0.0  # warmup starts from 0


def test_warmup_cosine_one_step_horizon_is_a_full_step():
  """num_steps=1 (optax's schedule raises there): the one step, and any after, at 1."""
  counts = jnp.arange(1, 4, dtype=jnp.int32)
  got = jax.vmap(lambda c: _update.warmup_cosine_multiplier(c, 1, 0.05))(counts)
  np.testing.assert_array_equal(got, np.ones(3))


def test_all_2d_split_needs_no_roles_and_picks_2d_leaves():
  params = {"conv": jnp.ones((3, 3, 2, 4)), "emb": jnp.ones((10, 8)),
            "w": jnp.ones((8, 8)), "b": jnp.ones(8)}
  lo = anchors.learned_prior()
  assert lo.config.muon and lo.config.muon_matrices == "all_2d"
  opt = lo.as_optax(num_steps=10)
  state = opt.init(params)  # no roles given, none inferred: no RoleInferenceWarning
  grads = jax.tree.map(lambda p: 0.1 * p, params)
  updates, _ = opt.update(grads, state, params)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_config_round_trips_and_old_json_unchanged():
  config = anchors.learned_prior().config
  assert LOConfig.from_json(config.to_json()) == config if hasattr(
      LOConfig, "from_json") else LOConfig.from_dict(config.to_dict()) == config
  assert "muon_matrices" not in LOConfig().to_dict()
  with pytest.raises(ValueError, match="muon_matrices='every'"):
    LOConfig(muon=True, muon_matrices="every")
  with pytest.raises(ValueError, match="horizon_decay='cosine'"):
    LOConfig(horizon_decay="cosine")
