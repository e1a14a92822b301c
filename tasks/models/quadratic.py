"""Noisy ill-conditioned quadratics: the simplest problem where step size matters.

``loss(x, noise) = mean_b 0.5/dim * (x - x* - eps_b)^T A (x - x* - eps_b)`` with
``A = Q diag(h) Q^T`` from :func:`tasks.data.synthetic.quadratic_problem` and
``eps_b ~ N(0, noise_std^2 I)`` drawn by ``sample_batch`` (so SGD-like gradient noise).
The eval batch has zero noise: its loss is the suboptimality ``f(x) - f(x*)``.
Parameters: ``{"x": (dim,)}`` with ``x ~ N(0, I)``, a ``vector`` role (no width).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from metaopt import mup
from tasks import base
from tasks.data import synthetic


@dataclasses.dataclass(frozen=True)
class QuadraticConfig:
  """Attributes: dimension, condition number of A, random rotation Q (else diagonal),
  std of the target noise, noise draws per batch, seed of (h, Q, x*)."""

  dim: int = 32
  condition_number: float = 100.0
  rotate: bool = True
  noise_std: float = 0.1
  batch_size: int = 4
  seed: int = 0

  @property
  def name(self) -> str:
    return (f"quadratic_d{self.dim}_k{self.condition_number:g}"
            f"{'_rot' if self.rotate else ''}_n{self.noise_std:g}")


def build(config: QuadraticConfig, num_steps: int = base.DEFAULT_NUM_STEPS) -> base.Task:
  h, q, x_star = (jnp.asarray(a) for a in synthetic.quadratic_problem(
      config.dim, config.condition_number, config.rotate, config.seed))

  def init(key):
    return {"x": jax.random.normal(key, (config.dim,), jnp.float32)}

  def loss(params, batch):
    z = (params["x"] - x_star - batch["noise"]) @ q  # (batch, dim) in A's eigenbasis
    return 0.5 / config.dim * jnp.mean(jnp.sum(h * z * z, axis=-1))

  def sample_batch(key, split="train"):
    if split not in ("train", "test"):
      raise ValueError(f"split={split!r}; expected train or test.")
    return {"noise": config.noise_std * jax.random.normal(key, (config.batch_size, config.dim))}

  return base.Task(
      name=config.name, config=config, init=init, loss=loss,
      metrics=lambda p, b: {"loss": loss(p, b)}, sample_batch=sample_batch,
      eval_batch=lambda: {"noise": jnp.zeros((1, config.dim), jnp.float32)},
      roles={"x": mup.vector_role()}, num_steps=num_steps)
