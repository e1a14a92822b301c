"""A reference training loop: an optax optimizer on a Task, unrolled with lax.scan.

For tests, benchmarks and quick baselines; meta-training has its own unrolls. The
optimizer receives ``value=loss`` (optimizers that need the loss, like MoMo, read it).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from tasks import base


def train_step(task: base.Task, optimizer: optax.GradientTransformation):
  """``(params, opt_state, key) -> (params, opt_state, loss)``: one step on a fresh batch."""
  opt = optax.with_extra_args_support(optimizer)

  def step(params, opt_state, key):
    batch = task.sample_batch(key)
    loss, grads = jax.value_and_grad(task.loss)(params, batch)
    updates, opt_state = opt.update(grads, opt_state, params, value=loss)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def train(task: base.Task, optimizer: optax.GradientTransformation, key: jax.Array,
          num_steps: int | None = None, params: Any = None) -> tuple[Any, jax.Array]:
  """Trains ``num_steps`` (default ``task.num_steps``) steps.

  Starts from ``params``, or from ``task.init`` of the first half of ``key`` when None;
  the second half of ``key`` orders the data. Returns ``(final_params, per-step train
  losses)``. Pure and jittable with ``task``, ``optimizer`` and ``num_steps`` static; vmap
  over ``key`` (and ``params``) for a population of seeds.
  """
  num_steps = task.num_steps if num_steps is None else num_steps
  init_key, data_key = jax.random.split(key)
  params = task.init(init_key) if params is None else params
  step = train_step(task, optimizer)

  def body(carry, k):
    params, opt_state = carry
    params, opt_state, loss = step(params, opt_state, k)
    return (params, opt_state), loss

  opt_state = optax.with_extra_args_support(optimizer).init(params)
  (params, _), losses = jax.lax.scan(body, (params, opt_state),
                                     jax.random.split(data_key, num_steps))
  return params, losses
