"""The ``heldout-user`` suite: user-written SP models whose roles are inferred."""

from __future__ import annotations

import warnings

import jax
import numpy as np
import optax
import pytest
from flax import linen as nn

import tasks
from metaopt import mup
from metaopt.eval import harness
from tasks import suites
from tasks.models import user

ENTRIES = suites.get_suite("heldout-user")


def test_suite_lists_six_user_models_at_about_heldouts_cost():
  names = [e.name for e in ENTRIES]
  assert len(names) >= 6 and len(set(names)) == len(names)
  assert {e.config.model for e in ENTRIES} == set(user.USER_MODELS)
  assert all(isinstance(e.config, tasks.UserModelConfig) for e in ENTRIES)
  assert max(e.num_steps for e in ENTRIES) <= 2000
  assert all(8 <= e.config.batch_size <= 512 for e in ENTRIES)
  # Sized like heldout (same runs per task, same cost model).
  ratio = harness.estimate_eval_seconds(ENTRIES) / harness.estimate_eval_seconds(
      suites.get_suite("heldout"))
  assert 0.5 < ratio < 1.5, ratio
  # Never a meta-training or validation task.
  others = {e.name for s in ("meta_train_default", "validation", "heldout")
            for e in suites.get_suite(s)}
  assert not others & set(names)
  config = ENTRIES[0].config
  assert tasks.config_from_json(tasks.config_to_json(config)) == config


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_task_builds_with_inferred_roles_and_adamw_lowers_its_loss(entry):
  with warnings.catch_warnings():
    warnings.simplefilter("error", mup.RoleInferenceWarning)  # a user would see none
    task = entry.build()
  kinds = [r.kind for r in jax.tree.leaves(task.roles, is_leaf=mup.is_role)]
  assert kinds.count("input") >= 1 and kinds.count("output") == 1, kinds
  assert kinds.count("hidden") >= 1, kinds
  steps = 40

  @jax.jit
  def run(key):
    params, losses = tasks.train(task, optax.adamw(1e-3), key, num_steps=steps)
    return losses, task.metrics(params, task.eval_batch())["loss"]

  losses, test_loss = run(jax.random.key(0))
  losses = np.asarray(losses)
  assert np.all(np.isfinite(losses)) and np.isfinite(float(test_loss))
  assert losses[-5:].mean() < losses[:5].mean(), losses


def test_lstm_init_runs_under_vmap():
  """Orthogonal recurrent init runs one key at a time under vmap (no batched QR)."""
  task = user.build(user.UserModelConfig("lstm", width=16, batch_size=8), 10)
  keys = jax.random.split(jax.random.key(0), 2)
  batched = jax.jit(jax.vmap(task.init))(keys)
  jax.tree.map(lambda b, s: np.testing.assert_allclose(b[1], s, rtol=1e-5, atol=1e-6),
               batched, task.init(keys[1]))


def test_user_cnn_matches_nn_conv():
  """The CNN's im2col convs have nn.Conv's parameters, initialization and outputs."""

  class Reference(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(16, (3, 3))(x))
      x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
      x = nn.avg_pool(x, (2, 2), strides=(2, 2)).reshape((x.shape[0], -1))
      x = nn.relu(nn.Dense(64)(x))
      return nn.Dense(10)(x)

  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
  params = user.CNN(64, 10).init(jax.random.key(0), x)
  reference = Reference().init(jax.random.key(0), x)
  jax.tree.map(np.testing.assert_array_equal, params, reference)
  np.testing.assert_allclose(user.CNN(64, 10).apply(params, x),
                             Reference().apply(params, x), atol=1e-5)


def test_evaluate_estimate_lists_the_suite(capsys):
  import evaluate  # pylint: disable=g-import-not-at-top
  assert evaluate.main(["--checkpoint", "default", "--suite", "heldout-user",
                        "--estimate"]) == 0
  assert "suite heldout-user: 6 tasks" in capsys.readouterr().err
