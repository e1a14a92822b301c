"""The learned optimizer's parameters (theta) and its per-parameter MLP.

theta = {
  "log_lr":  ()        global log step size,
  "mix":     (C,)      weights of the classical candidate directions,
  "w1": (F, H), "b1": (H,), "w2": (H, 2), "b2": (2,)   the residual MLP,
}

The MLP maps F features to a direction ``d`` and a log-magnitude ``m`` per parameter.
Its output layer starts at zero, so a fresh LO is exactly its classical mix.

The MLP is written as unrolled multiply-adds over the (few) features instead of a
matmul on an ``[n_params, F]`` matrix: XLA then fuses feature construction and the MLP
into one elementwise loop, which never materializes the feature matrix (1e7-parameter
updates stay within a small memory budget) and runs at memory bandwidth on CPUs.
Features that are constant over a tensor (time, per-tensor statistics) enter as a
per-tensor bias, costing nothing per parameter.
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


def mlp_outputs(theta: Theta, elementwise: Sequence[jax.Array], bias: jax.Array,
                dtype) -> tuple[jax.Array, jax.Array]:
  """(direction, log_magnitude) per element; ``elementwise`` are the first features.

  Unrolled so XLA fuses it elementwise (see the module docstring).
  """
  w1 = theta["w1"].astype(dtype)
  w2 = theta["w2"].astype(dtype)
  bias = bias.astype(dtype)
  direction = jnp.asarray(theta["b2"][0], dtype)
  log_mag = jnp.asarray(theta["b2"][1], dtype)
  for j in range(w1.shape[1]):
    h = bias[j]
    for i, f in enumerate(elementwise):
      h = h + w1[i, j] * f
    h = jax.nn.relu(h)
    direction = direction + w2[j, 0] * h
    log_mag = log_mag + w2[j, 1] * h
  return direction, log_mag
