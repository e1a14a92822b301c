"""Schedule-Free AdamW, on top of ``optax.contrib.schedule_free``.

Train at ``y`` (the parameters the optimizer returns); evaluate at ``x``, obtained with
:func:`schedule_free_eval_params` (re-exported from optax).
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import optax
from optax.contrib import schedule_free
from optax.contrib import schedule_free_eval_params

from metaopt.optimizers import _factory
from metaopt.optimizers import _validation

__all__ = ["schedule_free_adamw", "schedule_free_eval_params"]


def _linear_warmup(learning_rate, warmup_steps: int):
  """lr_k = lr * min(1, k / warmup_steps) at the 1-based step k schedule_free passes."""

  def schedule(step):
    peak = learning_rate(step) if callable(learning_rate) else learning_rate
    # max(warmup_steps, 1): a traced warmup_steps of 0 (inject_hyperparams) is no warmup.
    return peak * jnp.minimum(1.0, step / jnp.maximum(warmup_steps, 1))

  return schedule


def schedule_free_adamw(learning_rate: optax.ScalarOrSchedule = 0.0025,
                        warmup_steps: int = 0, b1: float = 0.9, b2: float = 0.999,
                        eps: float = 1e-8, weight_decay: float = 0.0, *,
                        mask: _factory.Mask = None
                        ) -> optax.GradientTransformationExtraArgs:
  """Schedule-Free AdamW: averaging replaces the learning-rate schedule.

  .. math::

    z_{k+1} &= z_k - \\eta_k \\Big(\\frac{g(y_k)}{\\sqrt{\\hat v_k} + \\epsilon} +
      \\lambda y_k\\Big), \\qquad
    x_{k+1} = (1 - c_{k+1}) x_k + c_{k+1} z_{k+1}, \\\\
    y_{k+1} &= \\beta_1 x_{k+1} + (1 - \\beta_1) z_{k+1}, \\qquad
    c_{k+1} = \\frac{w_k}{\\sum_{i \\le k} w_i}, \\quad
    w_k = (\\max_{i \\le k} \\eta_i)^2

  with :math:`\\eta_k` = ``learning_rate`` times the linear warmup
  :math:`\\min(1, k / \\text{warmup\\_steps})` (1-based :math:`k`, as in the reference
  code; optax 0.2.8 evaluates the z step one step earlier, so its warmup starts with a
  zero step), :math:`\\beta_1` = ``b1``, :math:`\\hat v` Adam's bias-corrected second moment
  with decay ``b2`` and :math:`\\lambda` = ``weight_decay`` (evaluated at ``y``).
  Gradients are taken at ``y``, the parameters this optimizer produces; evaluate the
  model at ``x = schedule_free_eval_params(state, params)``. Equals
  ``optax.contrib.schedule_free_adamw`` without warmup and with a constant learning
  rate (it delegates the averaging to ``optax.contrib.schedule_free``).

  Args:
    learning_rate: peak step size, a float or a schedule of the 1-based step k (no
      decay needed).
    warmup_steps: length of the linear warmup (0: none).
    b1: interpolation :math:`\\beta_1` between the average ``x`` and ``z``, in (0, 1).
    b2: decay of the second moment.
    eps: added to the denominator outside the square root.
    weight_decay: decoupled weight decay (multiplied by the learning rate).
    mask: the leaves to decay, as ``optax.masked`` reads it (None: every leaf).

  Returns:
    An ``optax.GradientTransformationExtraArgs``. Its ``init`` of a tree of
    ``jax.ShapeDtypeStruct`` returns the abstract state (``jax.eval_shape``): the
    state holds a copy of the parameters' values.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> opt = schedule_free_adamw(1e-2, warmup_steps=100)
    >>> params = jnp.array([1.0, 2.0])
    >>> state = opt.init(params)
    >>> u, state = opt.update(2 * params, state, params)
    >>> params = optax.apply_updates(params, u)
    >>> eval_params = schedule_free_eval_params(state, params)

  References:
    Defazio et al, "The Road Less Scheduled", arXiv:2405.15682, 2024
  """
  _validation.check_nonnegative(learning_rate=learning_rate, warmup_steps=warmup_steps)
  _validation.check_range(0.0, 1.0, low_inclusive=False, b1=b1)
  _validation.check_betas(b2=b2)
  _validation.check_positive(eps=eps)
  _validation.check_nonnegative(weight_decay=weight_decay)
  # Arrays (optax.inject_hyperparams passes them, concrete in init and traced in update)
  # always take the 0-safe warmup, so that init and update build the same state.
  if not isinstance(warmup_steps, numbers.Number) or warmup_steps:
    learning_rate = _linear_warmup(learning_rate, warmup_steps)
  # schedule_free weighs step k with learning_rate(k), k 1-based, while a chained
  # schedule sees the 0-based count: shift it so the z step uses the same rate (optax
  # 0.2.8 does not, so its first warmup step moves z by 0).
  z_learning_rate = ((lambda count: learning_rate(count + 1)) if callable(learning_rate)
                     else learning_rate)
  # Adam without momentum (the averaging plays its role): g / (sqrt(v_hat) + eps).
  base = _factory.decayed_descent(
      optax.scale_by_rms(decay=b2, eps=eps, eps_in_sqrt=False, bias_correction=True),
      z_learning_rate, weight_decay, mask)
  inner = schedule_free(base, learning_rate=learning_rate, b1=b1)
  return optax.GradientTransformationExtraArgs(_abstract_safe_init(inner.init), inner.update)


def _abstract_safe_init(init):
  """``init``, which on a tree with ``jax.ShapeDtypeStruct`` leaves returns the abstract
  state (``jax.eval_shape(init, params)``): the state holds ``z``, a copy of the params'
  values, which shapes alone do not give (optax's ``init`` fails on them)."""

  def init_fn(params):
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
      return jax.eval_shape(init, params)
    return init(params)

  return init_fn
