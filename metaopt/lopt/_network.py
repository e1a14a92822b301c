"""The learned optimizer's parameters (theta) and its per-parameter MLP.

theta = {
  "log_lr":  ()        global log step size,
  "mix":     (C,)      weights of the classical candidate directions,
  "w1": (F, H), "b1": (H,), "w2": (H, 2), "b2": (2,)   the residual MLP,
}

The MLP maps F features to a direction ``d`` and a log-magnitude ``m`` per parameter.
Its output layer starts at zero, so a fresh LO is exactly its classical mix.

Features that are constant over a tensor (time, per-tensor statistics) enter as a
per-tensor bias, costing nothing per parameter; the per-parameter features form an
``[n, F]`` matrix that the update builds in chunks for large tensors, so memory stays
bounded however large a tensor is.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from metaopt.lopt._config import CANDIDATE_NAMES, FEATURE_NAMES, LOConfig

Theta = dict


def init_theta(config: LOConfig, key: jax.Array, *, mix=None, log_lr: float = 0.0,
               hidden_scale: float = 1.0) -> Theta:
  """A fresh theta: random first layer (N(0, hidden_scale^2 / F)), zero output layer."""
  num_f, hidden = len(FEATURE_NAMES), config.hidden_size
  w1 = jax.random.normal(key, (num_f, hidden), jnp.float32) * (hidden_scale / num_f**0.5)
  if mix is None:
    mix = jnp.zeros((len(CANDIDATE_NAMES),), jnp.float32)
  return {
      "log_lr": jnp.asarray(log_lr, jnp.float32),
      "mix": jnp.asarray(mix, jnp.float32),
      "w1": w1,
      "b1": jnp.zeros((hidden,), jnp.float32),
      "w2": jnp.zeros((hidden, 2), jnp.float32),
      "b2": jnp.zeros((2,), jnp.float32),
  }


def theta_shapes(config: LOConfig) -> dict[str, tuple[int, ...]]:
  """Shapes of every theta entry for ``config`` (used to validate artifacts)."""
  num_f, hidden = len(FEATURE_NAMES), config.hidden_size
  return {"log_lr": (), "mix": (len(CANDIDATE_NAMES),), "w1": (num_f, hidden),
          "b1": (hidden,), "w2": (hidden, 2), "b2": (2,)}


def hidden_bias(theta: Theta, tensor_features: Sequence[jax.Array], offset: int):
  """b1 + sum_f w1[offset + f] * feature_f for scalar (per-tensor) features."""
  bias = theta["b1"]
  for i, f in enumerate(tensor_features):
    bias = bias + theta["w1"][offset + i] * f
  return bias


def mlp_outputs(theta: Theta, features: jax.Array, bias: jax.Array,
                dtype) -> tuple[jax.Array, jax.Array]:
  """(direction, log_magnitude) per element from ``features[..., F_elementwise]``.

  The per-tensor features enter through ``bias`` (see :func:`hidden_bias`).
  """
  num = features.shape[-1]
  hidden = jax.nn.relu(features @ theta["w1"][:num].astype(dtype) + bias.astype(dtype))
  out = hidden @ theta["w2"].astype(dtype) + theta["b2"].astype(dtype)
  return out[..., 0], out[..., 1]
