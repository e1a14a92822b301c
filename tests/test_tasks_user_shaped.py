"""The user-shaped task families (``sp_*``) and the ``validation-user`` suite."""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tasks
from metaopt import mup
from metaopt.eval import harness
from tasks import suites
from tasks.data import procedural

# Small members of each family (fast to compile and train), and the fields to shrink.
SMALL = {
    "sp_transformer_lm": dict(width=16, depth=1, heads=2, context=8, batch_size=16),
    "sp_recurrent": dict(width=16, depth=1, length=8, batch_size=16),
    "sp_autoencoder": dict(width=32, depth=1, input_dim=16, batch_size=32),
    "sp_resmlp": dict(width=16, depth=2, expansion=1, batch_size=16),
    "sp_convnet": dict(width=4, stages=1, batch_size=16),
    "sp_regression": dict(width=16, depth=2, num_train=128),
}


def test_every_user_shaped_family_is_named_and_small_configs_cover_them():
  assert set(suites.USER_SHAPED_FAMILY_NAMES) == set(SMALL)
  assert set(SMALL) <= set(suites.FAMILY_NAMES)
  batches = {b for name in SMALL for b in tasks.get_family(name).choices["batch_size"]}
  assert min(batches) == 16 and max(batches) == 512


def small_config(name: str, key: int):
  family = tasks.get_family(name)
  return dataclasses.replace(family.sample(jax.random.key(key)), **SMALL[name])


@pytest.mark.parametrize("name", sorted(SMALL))
def test_family_samples_build_and_adamw_lowers_the_loss(name):
  family = tasks.get_family(name)
  samples = [family.sample(jax.random.key(i)) for i in range(4)]
  assert samples == [family.sample(jax.random.key(i)) for i in range(4)]
  assert len(set(samples)) > 1
  for config in samples:
    assert tasks.config_from_json(tasks.config_to_json(config)) == config
    assert tasks.estimate_step_seconds(config) > 0
  config = small_config(name, 1)
  with warnings.catch_warnings():
    warnings.simplefilter("error", mup.RoleInferenceWarning)  # a user would see none
    task = family.build(config, num_steps=30)
  kinds = [r.kind for r in jax.tree.leaves(task.roles, is_leaf=mup.is_role)]
  assert kinds.count("input") >= 1 and kinds.count("output") == 1, kinds

  @jax.jit
  def run(key):
    params = task.init(key)
    loss, grads = jax.value_and_grad(task.loss)(params, task.sample_batch(key))
    _, losses = tasks.train(task, optax.adamw(3e-3), key, num_steps=30)
    return loss, grads, losses

  loss, grads, losses = run(jax.random.key(0))
  assert np.isfinite(float(loss))
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  losses = np.asarray(losses)
  assert np.all(np.isfinite(losses)) and losses[-5:].mean() < losses[:5].mean(), losses


def test_recurrent_init_runs_one_key_at_a_time_under_vmap():
  """Orthogonal init under vmap: no batched QR, same params as one key at a time."""
  config = tasks.SPRecurrentConfig("lstm", "language_model", width=8, length=6,
                                   batch_size=4)
  task = tasks.build(config, 10)
  keys = jax.random.split(jax.random.key(0), 2)
  batched = jax.jit(jax.vmap(task.init))(keys)
  jax.tree.map(lambda b, s: np.testing.assert_allclose(b[1], s, rtol=1e-5, atol=1e-6),
               batched, task.init(keys[1]))


def test_full_batch_regression_has_a_deterministic_gradient():
  config = tasks.SPRegressionConfig(width=8, depth=1, batch_size=512, num_train=128)
  assert config.full_batch and config.name.endswith("_full")
  task = tasks.build(config, 10)
  a, b = (task.sample_batch(jax.random.key(i)) for i in (0, 1))
  np.testing.assert_array_equal(a["x"], b["x"])
  assert a["x"].shape == (128, config.input_dim)


def test_procedural_data_is_seeded_and_shaped():
  corpus = procedural.markov_corpus(16, 2, 0)
  assert corpus.vocab_size == 16 and corpus.train_tokens.max() < 16
  np.testing.assert_array_equal(corpus.train_tokens,
                                procedural.markov_corpus.__wrapped__(16, 2, 0).train_tokens)
  # Order-2 structure: far below the uniform entropy (log 16 = 2.77 nats) per token.
  pairs = corpus.train_tokens[:-1] * 16 + corpus.train_tokens[1:]
  counts = np.bincount(pairs, minlength=256).reshape(16, 16) + 1e-9
  p = counts / counts.sum(1, keepdims=True)
  assert -np.sum(counts / counts.sum() * np.log(p)) < np.log(16)
  images = procedural.gratings(12, 6, 0)
  assert images.train_x.shape[1:] == (12, 12, 1) and images.num_classes == 6
  batch = procedural.adding_problem(jax.random.key(0), 5, 10)
  assert batch["x"].shape == (5, 10, 2) and batch["y"].shape == (5, 1)
  np.testing.assert_array_equal(jnp.sum(batch["x"][..., 1], axis=1), 2.0)


def _in_support(config, family: tasks.TaskFamily) -> bool:
  base = dataclasses.replace(family.base)
  return all(getattr(config, f.name) in family.choices.get(f.name, (getattr(base, f.name),))
             for f in dataclasses.fields(config))


def test_validation_user_suite_is_outside_every_family_and_heldout_user():
  entries = tasks.get_suite("validation-user")
  families = [tasks.get_family(n) for n in suites.USER_SHAPED_FAMILY_NAMES]
  assert {type(e.config) for e in entries} == {type(f.base) for f in families}
  for e in entries:
    (family,) = [f for f in families if isinstance(e.config, type(f.base))]
    assert not _in_support(e.config, family), e.name
  names = {e.name for e in entries}
  others = {e.name for s in ("heldout-user", "heldout", "validation", "meta_train_default")
            for e in tasks.get_suite(s)}
  assert not names & others
  assert harness.estimate_eval_seconds(entries, runs=1) < 60  # one LO pass each: cheap
