"""Generated data: teacher-student regression, Gaussian mixtures, quadratics.

Everything is drawn from ``numpy.random.default_rng(seed)`` with the seed stored in the
config, so a config names one fixed dataset; instances of a task differ only in their
initialization and data order.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from tasks.data.dataset import ArrayDataset


@dataclasses.dataclass(frozen=True)
class TeacherStudentData:
  """Regression onto a random one-hidden-layer tanh teacher plus Gaussian noise.

  ``y = W2 tanh(W1 x) / sqrt(teacher_width) + noise_std * eps`` with ``x ~ N(0, I)``
  and ``W1, W2`` standard normal (``W1`` scaled by ``1/sqrt(input_dim)``).
  """

  input_dim: int = 32
  output_dim: int = 4
  teacher_width: int = 64
  noise_std: float = 0.1
  num_train: int = 4096
  num_test: int = 1024
  seed: int = 0

  @property
  def input_shape(self) -> tuple[int, ...]:
    return (self.input_dim,)

  @property
  def num_outputs(self) -> int:
    return self.output_dim


@dataclasses.dataclass(frozen=True)
class GaussianMixtureData:
  """Classification of points from ``num_classes`` isotropic Gaussians.

  Class means are drawn N(0, separation^2 / dim * I), so the typical distance between two
  means is about ``separation * sqrt(2)`` in units of the unit within-class std.
  """

  num_classes: int = 10
  dim: int = 64
  separation: float = 3.0
  num_train: int = 4096
  num_test: int = 1024
  seed: int = 0

  @property
  def input_shape(self) -> tuple[int, ...]:
    return (self.dim,)

  @property
  def num_outputs(self) -> int:
    return self.num_classes


@functools.lru_cache(maxsize=None)
def load_teacher_student(config: TeacherStudentData) -> ArrayDataset:
  rng = np.random.default_rng(config.seed)
  w1 = rng.standard_normal((config.input_dim, config.teacher_width)) / np.sqrt(
      config.input_dim)
  w2 = rng.standard_normal((config.teacher_width, config.output_dim)) / np.sqrt(
      config.teacher_width)
  n = config.num_train + config.num_test
  x = rng.standard_normal((n, config.input_dim))
  y = np.tanh(x @ w1) @ w2 + config.noise_std * rng.standard_normal((n, config.output_dim))
  x, y = x.astype(np.float32), y.astype(np.float32)
  k = config.num_train
  return ArrayDataset("teacher_student", x[:k], y[:k], x[k:], y[k:], 0)


@functools.lru_cache(maxsize=None)
def load_gaussian_mixture(config: GaussianMixtureData) -> ArrayDataset:
  rng = np.random.default_rng(config.seed)
  means = rng.standard_normal(
      (config.num_classes, config.dim)) * config.separation / np.sqrt(config.dim)
  n = config.num_train + config.num_test
  y = rng.integers(0, config.num_classes, n).astype(np.int32)
  x = (means[y] + rng.standard_normal((n, config.dim))).astype(np.float32)
  k = config.num_train
  return ArrayDataset("gaussian_mixture", x[:k], y[:k], x[k:], y[k:], config.num_classes)


def quadratic_problem(dim: int, condition_number: float, rotate: bool,
                      seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """An ill-conditioned quadratic ``0.5 (x - x*)^T Q diag(h) Q^T (x - x*)``.

  Returns ``(h, q, x_star)``: eigenvalues log-spaced in ``[1/condition_number, 1]``,
  an orthogonal ``q`` (Haar-random if ``rotate``, else the identity) and a minimizer
  ``x* ~ N(0, I)``; all float32.
  """
  rng = np.random.default_rng(seed)
  h = np.logspace(-np.log10(condition_number), 0.0, dim)
  if rotate:
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    q = q * np.sign(np.diag(r))
  else:
    q = np.eye(dim)
  x_star = rng.standard_normal(dim)
  return h.astype(np.float32), q.astype(np.float32), x_star.astype(np.float32)
