"""The MLP of :mod:`tasks.models.mlp` in Haiku: the Task protocol is framework-agnostic.

Same layers, initializers, multipliers and roles as the Flax version (parameters
``w``/``b`` instead of ``kernel``/``bias``); ``tests/test_tasks_models.py`` checks the
two produce identical logits from the same weights.
"""

from __future__ import annotations

import math

import haiku as hk
import jax
import jax.numpy as jnp

from tasks import base
from tasks import data as data_lib
from tasks.models import _common
from tasks.models.mlp import MLPConfig
from tasks.models.mlp import mlp_roles

_FAN_IN_NORMAL = hk.initializers.VarianceScaling(1.0, "fan_in", "truncated_normal")


def _opaque_zeros(shape, dtype):
  """Zeros XLA cannot constant-fold (see ``tasks.models._common.opaque_zeros``)."""
  return _common.opaque_zeros(hk.next_rng_key(), shape, dtype)


def build(config: MLPConfig, num_steps: int = base.DEFAULT_NUM_STEPS) -> base.Task:
  """The Haiku MLP task of ``config``."""
  dataset = data_lib.load(config.data)
  input_dim = math.prod(dataset.input_shape)
  roles = mlp_roles(config, input_dim, kernel="w", bias="b")
  multiplier = roles["readout"]["w"].output_multiplier
  act = _common.activation_fn(config.activation)
  readout_init = _opaque_zeros if config.mup else _FAN_IN_NORMAL

  def forward(x):
    h = x.reshape((x.shape[0], -1))
    acts = {}
    for i in range(config.depth):
      h = act(hk.Linear(config.width, w_init=_FAN_IN_NORMAL, name=f"layer_{i}")(h))
      acts[f"hidden_{i}"] = h
    logits = hk.Linear(dataset.num_outputs, w_init=readout_init, name="readout")(h)
    return logits * multiplier, acts

  model = hk.without_apply_rng(hk.transform(forward))
  dummy = jnp.zeros((1, *dataset.input_shape), jnp.float32)

  def init(key):
    return model.init(key, dummy)

  def apply(params, x):
    return model.apply(params, x)[0]

  def activations(params, batch):
    logits, acts = model.apply(params, batch["x"])
    return {**acts, "logits": logits}

  return base.supervised_task(
      name=config.name, config=config, init=init, apply=apply,
      num_classes=dataset.num_classes,
      sample_batch=data_lib.batch_sampler(dataset, config.batch_size),
      eval_batch=lambda: data_lib.fixed_batch(dataset), roles=roles,
      num_steps=num_steps, activations=activations)
