"""Polyak-type step sizes with momentum: MoMo, MoMo-Adam and ALR-SMAG.

These optimizers need the current (batch) loss: call
``opt.update(grads, state, params, value=loss)``. Their step size is computed from the
loss, so the learning rate is a cap inside the step rather than a factor chained after a
direction, and weight decay enters the step itself: each is one transform rather than a
``scale_by_*`` chain.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metaopt import features
from metaopt.optimizers import _factory
from metaopt.optimizers import _validation

Tree = Any


def _at(schedule, count):
  return schedule(count) if callable(schedule) else schedule


def _decayed_step(params, direction, tau, lr, weight_decays):
  """Update of the proximal step x <- (x - tau * direction) / (1 + lr * lam), per leaf
  with that leaf's lam (a tree: ``weight_decays``)."""

  def leaf(p, d, weight_decay):
    shrink = 1 + lr * weight_decay
    # In the parameter's dtype: tau and the sums behind it are promoted over all leaves.
    return (-(lr * weight_decay) / shrink * p - tau * d / shrink).astype(p.dtype)

  return jax.tree.map(leaf, params, direction, weight_decays)


def _masked_model_sums(mask, params, lr, weight_decay, d, d_scaled):
  """``<d, x>`` and ``<d, d_scaled>`` of MoMo's step when ``mask`` leaves leaves undecayed.

  With the proximal step ``x_i <- (x_i - tau d_i) / (1 + lr lam_i)`` and ``lam_i`` = 0 off
  the mask, tau's closed form is MoMo's with each leaf's terms weighted by
  ``(1 + lr lam) / (1 + lr lam_i)``: 1 on decayed leaves, ``1 + lr lam`` on the others.
  """
  off_weight = 1 + lr * weight_decay
  weights = jax.tree.map(lambda on: 1.0 if on else off_weight,
                         _factory.decayed_leaves(mask, params))
  weighted = jax.tree.map(lambda w, v: (w * v).astype(v.dtype), weights, d)
  return features.tree_vdot(weighted, params), features.tree_vdot(weighted, d_scaled)


class MomoState(NamedTuple):
  """State of :func:`momo`: EMAs of the gradient, loss and <g, x>, lower bound."""

  count: jax.Array  # shape=(), dtype=int32.
  momentum: Tree
  loss_avg: jax.Array
  grad_dot_param_avg: jax.Array
  lower_bound: jax.Array


def momo(learning_rate: optax.ScalarOrSchedule = 1.0, beta: float = 0.9,
         lower_bound: float = 0.0, weight_decay: float = 0.0,
         adapt_lower_bound: bool = False, *, mask: _factory.Mask = None
         ) -> optax.GradientTransformationExtraArgs:
  """MoMo: SGD with momentum and a model-based Polyak step size.

  .. math::

    d &\\leftarrow \\beta d + (1-\\beta) g, \\quad
    \\bar f \\leftarrow \\beta \\bar f + (1-\\beta) f, \\quad
    \\gamma \\leftarrow \\beta \\gamma + (1-\\beta) \\langle g, x\\rangle
    \\quad (\\text{step 1: } d = g, \\bar f = f, \\gamma = \\langle g, x \\rangle) \\\\
    \\tau &= \\min\\Big(\\alpha, \\frac{[(1+\\alpha\\lambda)(\\bar f - f_* - \\gamma) +
      \\langle d, x\\rangle]_+}{\\|d\\|^2}\\Big), \\qquad
    x \\leftarrow \\frac{x - \\tau d}{1 + \\alpha\\lambda}

  with :math:`\\alpha` = ``learning_rate``, :math:`\\beta` = ``beta``, :math:`f_*` =
  ``lower_bound``, :math:`\\lambda` = ``weight_decay``; norms and inner products sum
  over all leaves, and :math:`\\tau = 0` when :math:`\\|d\\|^2` is below the float eps.
  Equals ``optax.contrib.momo`` at ``weight_decay=0``. With ``weight_decay > 0`` it
  follows the paper's proximal step :math:`(x - \\tau d)/(1+\\alpha\\lambda)`; optax
  0.2.8 applies :math:`x/(1+\\alpha\\lambda) - \\tau d` instead (a known deviation).

  Args:
    learning_rate: the cap :math:`\\alpha` on the step size, a float or a schedule.
    beta: momentum decay of the EMAs.
    lower_bound: lower bound :math:`f_*` of the loss (0 for most losses).
    weight_decay: weight decay :math:`\\lambda` of the proximal step.
    adapt_lower_bound: estimate the lower bound online (paper, Sec. 5), starting from
      ``lower_bound`` and never going below it.
    mask: the leaves to decay, as ``optax.masked`` reads it (None: every leaf). The
      step is then the proximal step of the partly decayed model: masked-off leaves
      are not shrunk and weigh ``1 + alpha * lam`` in :math:`\\langle d, x\\rangle`
      and :math:`\\|d\\|^2` (an all-False mask equals ``weight_decay=0``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``value=loss``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> opt = momo()
    >>> params = jnp.array([1.0, 2.0])
    >>> loss, grads = jax.value_and_grad(lambda x: jnp.sum(x ** 2))(params)
    >>> u, state = opt.update(grads, opt.init(params), params, value=loss)
    >>> params = optax.apply_updates(params, u)

  References:
    Schaipp et al, "MoMo: Momentum Models for Adaptive Learning Rates",
    arXiv:2305.07583, 2023
  """
  _validation.check_nonnegative(learning_rate=learning_rate)
  _validation.check_betas(beta=beta)
  _validation.check_nonnegative(weight_decay=weight_decay)

  def init_fn(params):
    dtype = features.tree_lowest_dtype(params)  # also of ShapeDtypeStructs
    zero = jnp.zeros([], dtype)
    return MomoState(jnp.zeros([], jnp.int32), optax.tree.zeros_like(params), zero, zero,
                     jnp.asarray(lower_bound, dtype))

  def update_fn(updates, state, params=None, *, value=None, **extra_args):
    del extra_args
    _validation.require_params(params, "momo")
    _validation.require_value(value, "momo")
    decay = jnp.where(state.count == 0, 0.0, beta)
    momentum = features.update_ema(updates=updates, moments=state.momentum, decay=decay)
    loss = jnp.asarray(value, state.loss_avg.dtype)
    loss_avg = features.update_ema(updates=loss, moments=state.loss_avg, decay=decay)
    gamma = features.update_ema(updates=features.tree_vdot(updates, params),
                                moments=state.grad_dot_param_avg, decay=decay
                                ).astype(state.grad_dot_param_avg.dtype)
    d_norm_sq = features.global_norm_sq(momentum)
    d_dot_x = features.tree_vdot(momentum, params)
    lr = _at(learning_rate, state.count)
    step_d_dot_x, step_d_norm_sq = d_dot_x, d_norm_sq
    if mask is not None:
      step_d_dot_x, step_d_norm_sq = _masked_model_sums(mask, params, lr, weight_decay,
                                                        momentum, momentum)
    lb = state.lower_bound
    if adapt_lower_bound:
      lb = features.momo_lower_bound_reset(lb, lr, loss_avg, gamma, step_d_dot_x,
                                           weight_decay, lower_bound)
    tau = features.momo_polyak_step(lr, loss_avg, gamma, step_d_dot_x, step_d_norm_sq, lb,
                                    weight_decay)
    if adapt_lower_bound:
      lb = features.momo_lower_bound_update(tau, loss_avg, gamma, d_dot_x, d_norm_sq,
                                            lower_bound)
    new_updates = _decayed_step(params, momentum, tau, lr,
                                _factory.masked_weight_decay(weight_decay, mask, params))
    return new_updates, MomoState(optax.safe_increment(state.count), momentum, loss_avg,
                                  gamma, lb.astype(state.lower_bound.dtype))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class MomoAdamState(NamedTuple):
  """State of :func:`momo_adam`: Adam moments, EMAs of loss and <g, x>, lower bound."""

  count: jax.Array  # shape=(), dtype=int32.
  mu: Tree
  nu: Tree
  loss_avg: jax.Array
  grad_dot_param_avg: jax.Array
  lower_bound: jax.Array


def momo_adam(learning_rate: optax.ScalarOrSchedule = 1e-2, b1: float = 0.9,
              b2: float = 0.999, eps: float = 1e-8, lower_bound: float = 0.0,
              weight_decay: float = 0.0, adapt_lower_bound: bool = False, *,
              mask: _factory.Mask = None) -> optax.GradientTransformationExtraArgs:
  """MoMo-Adam: Adam's preconditioned momentum with a model-based Polyak step size.

  .. math::

    d, \\bar f, \\gamma &\\;\\text{as in MoMo with } \\beta_1 \\text{ (EMAs from 0)}, \\quad
    v \\leftarrow \\beta_2 v + (1-\\beta_2) g^2, \\quad
    D = \\sqrt{v/(1-\\beta_2^k)} + \\epsilon, \\quad \\rho_k = 1 - \\beta_1^k \\\\
    \\tau &= \\min\\Big(\\frac{\\alpha}{\\rho_k},
      \\frac{[(1+\\alpha\\lambda)(\\bar f - \\rho_k f_* - \\gamma) +
      \\langle d, x\\rangle]_+}{\\langle d, d/D\\rangle}\\Big), \\qquad
    x \\leftarrow \\frac{x - \\tau d / D}{1 + \\alpha\\lambda}

  with :math:`\\alpha` = ``learning_rate``, :math:`\\beta_1, \\beta_2, \\epsilon` =
  ``b1, b2, eps``, :math:`f_*` = ``lower_bound``, :math:`\\lambda` = ``weight_decay``.
  Equals ``optax.contrib.momo_adam`` at ``weight_decay=0``. With ``weight_decay > 0``
  it follows the paper's proximal step; optax 0.2.8 applies
  :math:`x/(1+\\alpha\\lambda) - \\tau d/D` instead (a known deviation).

  Args:
    learning_rate: the cap :math:`\\alpha` on the step size, a float or a schedule.
    b1: decay of the gradient, loss and <g, x> EMAs.
    b2: decay of the second moment.
    eps: added to Adam's denominator outside the square root.
    lower_bound: lower bound :math:`f_*` of the loss (0 for most losses).
    weight_decay: weight decay :math:`\\lambda` of the proximal step.
    adapt_lower_bound: estimate the lower bound online (paper, Sec. 5), starting from
      ``lower_bound`` and never going below it.
    mask: the leaves to decay, as ``optax.masked`` reads it (None: every leaf). The
      step is then the proximal step of the partly decayed model: masked-off leaves
      are not shrunk and weigh ``1 + alpha * lam`` in :math:`\\langle d, x\\rangle`
      and :math:`\\langle d, d/D\\rangle` (an all-False mask equals ``weight_decay=0``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``value=loss``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> opt = momo_adam()
    >>> params = jnp.array([1.0, 2.0])
    >>> loss, grads = jax.value_and_grad(lambda x: jnp.sum(x ** 2))(params)
    >>> u, state = opt.update(grads, opt.init(params), params, value=loss)

  References:
    Schaipp et al, "MoMo: Momentum Models for Adaptive Learning Rates",
    arXiv:2305.07583, 2023
  """
  _validation.check_nonnegative(learning_rate=learning_rate)
  _validation.check_betas(b1=b1, b2=b2)
  _validation.check_positive(eps=eps)
  _validation.check_nonnegative(weight_decay=weight_decay)

  def init_fn(params):
    dtype = features.tree_lowest_dtype(params)  # also of ShapeDtypeStructs
    zero = jnp.zeros([], dtype)
    zeros = optax.tree.zeros_like(params)
    return MomoAdamState(jnp.zeros([], jnp.int32), zeros, zeros, zero, zero,
                         jnp.asarray(lower_bound, dtype))

  def update_fn(updates, state, params=None, *, value=None, **extra_args):
    del extra_args
    _validation.require_params(params, "momo_adam")
    _validation.require_value(value, "momo_adam")
    count = optax.safe_increment(state.count)
    dtype = state.loss_avg.dtype
    loss_avg = features.update_ema(updates=jnp.asarray(value, dtype), moments=state.loss_avg,
                                   decay=b1)
    mu = features.update_ema(updates=updates, moments=state.mu, decay=b1)
    nu = features.update_second_moment(state.nu, updates, b2)
    direction = features.adam_direction(mu, features.bias_correction(nu, b2, count), eps)
    d_norm_sq = features.tree_vdot(mu, direction)
    gamma = features.update_ema(updates=features.tree_vdot(updates, params),
                                moments=state.grad_dot_param_avg, decay=b1
                                ).astype(state.grad_dot_param_avg.dtype)
    d_dot_x = features.tree_vdot(mu, params)
    lr = _at(learning_rate, state.count)
    rho = jnp.asarray(1 - b1**count, dtype)
    step_d_dot_x, step_d_norm_sq = d_dot_x, d_norm_sq
    if mask is not None:
      step_d_dot_x, step_d_norm_sq = _masked_model_sums(mask, params, lr, weight_decay, mu,
                                                        direction)
    lb = state.lower_bound
    if adapt_lower_bound:
      lb = features.momo_lower_bound_reset(lb, lr, loss_avg, gamma, step_d_dot_x,
                                           weight_decay, lower_bound, rho=rho)
    tau = features.momo_polyak_step(lr, loss_avg, gamma, step_d_dot_x, step_d_norm_sq,
                                    rho * lb, weight_decay, max_step=lr / rho)
    if adapt_lower_bound:
      lb = features.momo_lower_bound_update(tau, loss_avg, gamma, d_dot_x, d_norm_sq,
                                            lower_bound, rho=rho)
    new_updates = _decayed_step(params, direction, tau, lr,
                                _factory.masked_weight_decay(weight_decay, mask, params))
    return new_updates, MomoAdamState(count, mu, nu, loss_avg, gamma,
                                      lb.astype(state.lower_bound.dtype))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class AlrSmagState(NamedTuple):
  """State of :func:`alr_smag`: step count and the heavy-ball momentum sum."""

  count: jax.Array  # shape=(), dtype=int32.
  momentum: Tree


def alr_smag(learning_rate: optax.ScalarOrSchedule = 0.1, beta: float = 0.9,
             lower_bound: float = 0.0, c: float = 1.0, weight_decay: float = 0.0, *,
             mask: _factory.Mask = None) -> optax.GradientTransformationExtraArgs:
  """ALR-SMAG: heavy-ball momentum with a generalized Polyak step size.

  .. math::

    d_k = \\beta d_{k-1} + g_k, \\qquad
    \\tau_k = \\min\\Big(\\gamma_b, \\frac{f_k - f_*}{c \\|d_k\\|^2}\\Big), \\qquad
    x \\leftarrow x (1 - \\lambda \\tau_k) - \\tau_k d_k

  with :math:`\\gamma_b` = ``learning_rate`` (the largest step), :math:`\\beta` =
  ``beta``, :math:`f_*` = ``lower_bound``, :math:`c` = ``c``, :math:`\\lambda` =
  ``weight_decay``; :math:`\\|d\\|^2` sums over all leaves and :math:`\\tau = 0` when it
  is below the float eps. With ``c = 1`` and ``weight_decay = 0`` the update equals
  ``-chain(optax.trace(beta), optax.scale_by_polyak(f_min, max_learning_rate))``.

  Args:
    learning_rate: the largest step :math:`\\gamma_b`, a float or a schedule.
    beta: decay of the momentum sum.
    lower_bound: lower bound :math:`f_*` of the loss (0 for most losses).
    c: the constant :math:`c > 0` dividing the Polyak step.
    weight_decay: weight decay :math:`\\lambda`, scaled by the step :math:`\\tau_k`.
    mask: the leaves to decay, as ``optax.masked`` reads it (None: every leaf).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``value=loss``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> opt = alr_smag()
    >>> params = jnp.array([1.0, 2.0])
    >>> loss, grads = jax.value_and_grad(lambda x: jnp.sum(x ** 2))(params)
    >>> u, state = opt.update(grads, opt.init(params), params, value=loss)

  References:
    Wang et al, "Generalized Polyak Step Size for First Order Optimization with
    Momentum", arXiv:2305.12939, 2023
  """
  _validation.check_nonnegative(learning_rate=learning_rate)
  _validation.check_betas(beta=beta)
  _validation.check_positive(c=c)
  _validation.check_nonnegative(weight_decay=weight_decay)

  def init_fn(params):
    return AlrSmagState(jnp.zeros([], jnp.int32), optax.tree.zeros_like(params))

  def update_fn(updates, state, params=None, *, value=None, **extra_args):
    del extra_args
    _validation.require_params(params, "alr_smag")
    _validation.require_value(value, "alr_smag")
    momentum = features.update_sum_momentum(state.momentum, updates, beta)
    d_norm_sq = features.global_norm_sq(momentum)
    nonzero = d_norm_sq > jnp.finfo(d_norm_sq.dtype).eps
    step = features.alr_smag_step(jnp.asarray(value, d_norm_sq.dtype),
                                  jnp.where(nonzero, d_norm_sq, 1.0), lower_bound, c,
                                  _at(learning_rate, state.count))
    tau = jnp.where(nonzero, step, 0.0)
    new_updates = jax.tree.map(lambda p, d, wd: (-(wd * tau) * p - tau * d).astype(p.dtype),
                               params, momentum,
                               _factory.masked_weight_decay(weight_decay, mask, params))
    return new_updates, AlrSmagState(optax.safe_increment(state.count), momentum)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
