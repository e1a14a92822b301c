"""The learned optimizer's parameters (theta) and its per-parameter MLP.

theta = {
  "log_lr":  ()        global log step size,
  "mix":     (C,)      weights of the classical candidate directions,
  "hidden_mix": (C,)   only with ``LOConfig.muon``: added to ``mix`` on hidden matrices
                       (each switch's entries: ``Switch.theta_shapes``),
  "w1": (F, H), "b1": (H,), "w2": (H, 2), "b2": (2,)   the one-hidden-layer MLP,
}

C and F are ``len(config.candidate_names)`` and ``len(config.feature_names)``.

The MLP maps F features to a direction ``d`` and a log-magnitude ``m`` per parameter.
Its output layer starts at zero, so a fresh LO is exactly its classical mix.

Features that are constant over a tensor (time, per-tensor statistics) enter as a
per-tensor bias, costing nothing per parameter. The per-parameter features stay
separate arrays, one per feature: the MLP runs as per-output multiply-adds over them,
which XLA fuses into one elementwise loop, so no ``[n, F]`` matrix is ever built.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from metaopt.lopt._config import LOConfig

Theta = dict


def init_theta(config: LOConfig, key: jax.Array, *, mix=None, log_lr: float = 0.0,
               hidden_scale: float = 1.0, **switch_entries) -> Theta:
  """A fresh theta: random first layer (N(0, hidden_scale^2 / F)), zero output layer.

  ``mix`` and the entries the switches turned on add (``hidden_mix=`` with ``muon``)
  default to zeros; an entry of a switch turned off is dropped.
  """
  num_f, hidden = config.num_features, config.hidden_size
  w1 = jax.random.normal(key, (num_f, hidden), jnp.float32) * (hidden_scale / num_f**0.5)
  zeros = jnp.zeros((len(config.candidate_names),), jnp.float32)
  theta = {
      "log_lr": jnp.asarray(log_lr, jnp.float32),
      "mix": zeros if mix is None else jnp.asarray(mix, jnp.float32),
      "w1": w1,
      "b1": jnp.zeros((hidden,), jnp.float32),
      "w2": jnp.zeros((hidden, 2), jnp.float32),
      "b2": jnp.zeros((2,), jnp.float32),
  }
  for name, shape in _switch_shapes(config).items():
    value = switch_entries.get(name)
    theta[name] = (jnp.zeros(shape, jnp.float32) if value is None else
                   jnp.asarray(value, jnp.float32))
  return theta


def _switch_shapes(config: LOConfig) -> dict[str, tuple[int, ...]]:
  """The theta entries the switches turned on add, with their shapes."""
  num_c = len(config.candidate_names)
  return {name: shape for s in config.switches_on
          for name, shape in s.theta_shapes(config, num_c).items()}


def theta_shapes(config: LOConfig) -> dict[str, tuple[int, ...]]:
  """Shapes of every theta entry for ``config`` (used to validate artifacts)."""
  num_f, hidden = config.num_features, config.hidden_size
  num_c = len(config.candidate_names)
  shapes = {"log_lr": (), "mix": (num_c,), "w1": (num_f, hidden), "b1": (hidden,),
            "w2": (hidden, 2), "b2": (2,)}
  return {**shapes, **_switch_shapes(config)}


def hidden_bias(theta: Theta, tensor_features: jax.Array, rows: Sequence[int]) -> jax.Array:
  """b1 + tensor_features @ w1[rows] for per-tensor features.

  ``tensor_features`` is ``[..., k]`` (one row per tensor) and ``rows`` the ``k`` rows
  of ``w1`` that weigh them; returns ``[..., hidden]``.
  """
  w1 = theta["w1"]
  rows = tuple(rows)
  assert tensor_features.shape[-1] == len(rows)
  if rows == tuple(range(rows[0], rows[0] + len(rows))):  # contiguous: a slice.
    weights = w1[rows[0]:rows[0] + len(rows)]
  else:
    weights = w1[np.asarray(rows)]
  return theta["b1"] + tensor_features.astype(w1.dtype) @ weights


def mlp_outputs_elementwise(theta: Theta, features: Sequence[jax.Array], bias: jax.Array,
                            dtype, rows: Sequence[int] | None = None
                            ) -> tuple[jax.Array, jax.Array]:
  """(direction, log_magnitude) per element from per-parameter feature arrays.

  ``features[f]`` is an elementwise feature (all of one shape) whose weights are row
  ``rows[f]`` of ``w1`` (default: row f); the per-tensor features enter through
  ``bias`` (see :func:`hidden_bias`). Computes
  ``relu(sum_f features[f] w1[rows[f]] + bias) @ w2 + b2`` one hidden unit at a time.
  """
  w1, w2 = theta["w1"].astype(dtype), theta["w2"].astype(dtype)
  b2, bias = theta["b2"].astype(dtype), bias.astype(dtype)
  rows = range(len(features)) if rows is None else rows
  out = [b2[0], b2[1]]
  for j in range(w1.shape[1]):
    pre = bias[j]
    for f, feat in zip(rows, features):
      pre = pre + feat * w1[f, j]
    hidden = jax.nn.relu(pre)
    out = [out[0] + hidden * w2[j, 0], out[1] + hidden * w2[j, 1]]
  return out[0], out[1]
