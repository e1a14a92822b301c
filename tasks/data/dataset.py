"""In-memory datasets and on-device batch sampling.

A dataset is a handful of arrays small enough to live in device memory; batches are
drawn inside jit by indexing them with ``jax.random`` indices (sampling with
replacement), so a training loop has no Python iterator on its hot path and a
population of runs with different data orders is one ``vmap`` over keys.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
  """Train and test arrays of one supervised problem.

  Attributes:
    name: a short name for reports.
    train_x, train_y, test_x, test_y: numpy arrays; ``x`` float32 of shape
      ``(n, *input_shape)``, ``y`` int32 labels ``(n,)`` for classification or
      float32 targets ``(n, num_outputs)`` for regression.
    num_classes: number of classes, or 0 for a regression problem.
  """

  name: str
  train_x: np.ndarray
  train_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  num_classes: int

  @property
  def is_classification(self) -> bool:
    return self.num_classes > 0

  @property
  def input_shape(self) -> tuple[int, ...]:
    return tuple(self.train_x.shape[1:])

  @property
  def num_outputs(self) -> int:
    return self.num_classes if self.is_classification else int(self.train_y.shape[-1])

  def split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    if split not in SPLITS:
      raise ValueError(f"split={split!r}; expected one of {SPLITS}.")
    return (self.train_x, self.train_y) if split == "train" else (self.test_x, self.test_y)


def batch_sampler(data: ArrayDataset, batch_size: int):
  """Returns ``sample_batch(key, split="train") -> {"x", "y"}`` over device arrays.

  Jittable and vmappable: the arrays are closed over as constants and indexed with
  ``jax.random.randint`` indices drawn with replacement.
  """
  arrays = {s: tuple(jnp.asarray(a) for a in data.split(s)) for s in SPLITS}

  def sample_batch(key: jax.Array, split: str = "train") -> dict[str, Any]:
    if split not in arrays:
      raise ValueError(f"split={split!r}; expected one of {SPLITS}.")
    x, y = arrays[split]
    idx = jax.random.randint(key, (batch_size,), 0, x.shape[0])
    return {"x": x[idx], "y": y[idx]}

  return sample_batch


def fixed_batch(data: ArrayDataset, split: str = "test", size: int = 1024) -> dict[str, Any]:
  """The first ``size`` examples of ``split`` (all of them if fewer): a fixed eval batch."""
  x, y = data.split(split)
  return {"x": jnp.asarray(x[:size]), "y": jnp.asarray(y[:size])}


def standardize(train_x: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
  """Shifts and scales every array by the train set's global mean and std (float32)."""
  mean, std = float(train_x.mean()), float(train_x.std()) + 1e-8
  return tuple(((a - mean) / std).astype(np.float32) for a in (train_x, *others))
