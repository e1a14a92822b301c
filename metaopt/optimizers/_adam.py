"""Adam-family optimizers: AdamW, muP AdamW and Lion.

``adamw`` and ``lion`` equal ``optax.adamw`` and ``optax.lion`` (same defaults);
``mu_adamw`` is AdamW whose hidden-layer updates are scaled by muP
(:func:`metaopt.mup.scale_by_mup`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metaopt import features
from metaopt import mup
from metaopt.optimizers import _factory
from metaopt.optimizers import _validation

Tree = Any


class ScaleByAdamState(NamedTuple):
  """State of :func:`scale_by_adam`: step count, first and second moments."""

  count: jax.Array  # shape=(), dtype=int32.
  mu: Tree
  nu: Tree


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                  eps_root: float = 0.0, mu_dtype=None, *, nesterov: bool = False
                  ) -> optax.GradientTransformation:
  """Adam's bias-corrected direction (the direction part of AdamW), or NAdam's.

  .. math::

    m_t = \\beta_1 m_{t-1} + (1-\\beta_1) g_t, \\quad
    v_t = \\beta_2 v_{t-1} + (1-\\beta_2) g_t^2, \\quad
    u_t = \\frac{\\hat m_t}{\\sqrt{v_t / (1-\\beta_2^t) + \\bar\\epsilon} + \\epsilon},
    \\quad \\hat m_t = \\frac{m_t}{1-\\beta_1^t}

  with :math:`\\beta_1, \\beta_2, \\epsilon, \\bar\\epsilon` = ``b1, b2, eps,
  eps_root``; with ``nesterov``, :math:`\\hat m_t` is the look-ahead
  :math:`\\beta_1 m_t / (1-\\beta_1^{t+1}) + (1-\\beta_1) g_t / (1-\\beta_1^t)`
  (:func:`metaopt.features.nesterov_momentum`), as in ``optax.scale_by_adam``.

  Args:
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the denominator outside the square root.
    eps_root: added inside the square root.
    mu_dtype: dtype of the first moment (None: the parameters').
    nesterov: use the Nesterov look-ahead (NAdam; Dozat, 2016).

  Returns:
    An ``optax.GradientTransformation`` with state :class:`ScaleByAdamState`.

  Example:
    >>> import jax.numpy as jnp
    >>> tx = scale_by_adam()
    >>> u, state = tx.update(jnp.ones(3), tx.init(jnp.zeros(3)))

  References:
    Kingma et al, "Adam: A Method for Stochastic Optimization", arXiv:1412.6980, 2014

    Dozat, "Incorporating Nesterov Momentum into Adam", ICLR workshop, 2016
  """
  _validation.check_betas(b1=b1, b2=b2)
  _validation.check_positive(eps=eps)
  _validation.check_nonnegative(eps_root=eps_root)

  def init_fn(params):
    return ScaleByAdamState(jnp.zeros([], jnp.int32),
                            optax.tree.zeros_like(params, dtype=mu_dtype),
                            optax.tree.zeros_like(params))

  def update_fn(updates, state, params=None):
    del params
    mu = features.update_ema(updates=updates, moments=state.mu, decay=b1)
    nu = features.update_second_moment(state.nu, updates, b2)
    count = optax.safe_increment(state.count)
    m_hat = (features.nesterov_momentum(mu, updates, b1, count) if nesterov else
             features.bias_correction(mu, b1, count))
    direction = features.adam_direction(m_hat, features.bias_correction(nu, b2, count),
                                        eps, eps_root)
    mu = optax.tree.cast(mu, mu_dtype) if mu_dtype is not None else (
        optax.tree.cast_like(mu, state.mu))
    return direction, ScaleByAdamState(count, mu, optax.tree.cast_like(nu, state.nu))

  return optax.GradientTransformation(init_fn, update_fn)


def adamw(learning_rate: optax.ScalarOrSchedule = 1e-3, b1: float = 0.9,
          b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0,
          weight_decay: optax.ScalarOrSchedule = 1e-4, *, mask: _factory.Mask = None
          ) -> optax.GradientTransformationExtraArgs:
  """Adam with decoupled weight decay; equals ``optax.adamw``.

  .. math::

    \\theta_t = \\theta_{t-1} - \\eta_t \\left(\\frac{\\hat m_t}{\\sqrt{\\hat v_t +
      \\bar\\epsilon} + \\epsilon} + \\lambda \\theta_{t-1}\\right)

  with :math:`\\hat m, \\hat v` from :func:`scale_by_adam`, :math:`\\eta` =
  ``learning_rate`` and :math:`\\lambda` = ``weight_decay`` (multiplied by the
  learning rate, as in optax and PyTorch), applied to the leaves ``mask`` selects.

  Args:
    learning_rate: step size, a float or an optax schedule.
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the denominator outside the square root.
    eps_root: added inside the square root.
    weight_decay: decoupled weight decay.
    mask: the leaves to decay, as ``optax.masked`` reads it (None: every leaf).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> opt = adamw(1e-3)
    >>> params = jnp.array([1.0, 2.0])
    >>> u, state = opt.update(2 * params, opt.init(params), params)
    >>> params = optax.apply_updates(params, u)

  References:
    Loshchilov et al, "Decoupled Weight Decay Regularization", arXiv:1711.05101, 2017
  """
  return _factory.decayed_descent(scale_by_adam(b1, b2, eps, eps_root), learning_rate,
                                  weight_decay, mask)


def mu_adamw(learning_rate: optax.ScalarOrSchedule, roles: mup.RolesOrFn,
             b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
             eps_root: float = 0.0, weight_decay: optax.ScalarOrSchedule = 1e-4, *,
             mask: _factory.Mask = None) -> optax.GradientTransformationExtraArgs:
  """AdamW under muP: hidden-layer updates scaled by ``base_fan_in / fan_in``.

  .. math::

    \\theta_t = \\theta_{t-1} - \\eta_t\\, s_\\ell \\left(\\frac{\\hat m_t}{\\sqrt{\\hat v_t
      + \\bar\\epsilon} + \\epsilon} + \\lambda \\theta_{t-1}\\right), \\qquad
    s_\\ell = b_\\ell / n_\\ell \\text{ for hidden leaves, else } 1

  with :math:`n_\\ell, b_\\ell` the leaf's fan-in and base fan-in from ``roles``. The
  muP factor applies after the decay term and before the learning rate, so the
  product ``learning_rate * weight_decay`` transfers across widths like the step.
  With all leaves ``vector`` (or ``input``/``output``) it equals :func:`adamw`.

  Args:
    learning_rate: step size (tuned at the base width), a float or an optax schedule.
    roles: a :class:`metaopt.mup.ParamRole` tree matching the parameters, or a
      callable ``params -> roles`` (checked against the parameters at ``init``).
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the denominator outside the square root.
    eps_root: added inside the square root.
    weight_decay: decoupled weight decay.
    mask: the leaves to decay, as ``optax.masked`` reads it (None: every leaf).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp
    >>> from metaopt import mup
    >>> params = {"w": jnp.zeros((128, 128)), "b": jnp.zeros(128)}
    >>> roles = {"w": mup.hidden_role(128, 64), "b": mup.vector_role()}
    >>> opt = mu_adamw(1e-3, roles)
    >>> u, state = opt.update(params, opt.init(params), params)

  References:
    Yang et al, "Tensor Programs V: Tuning Large Neural Networks via Zero-Shot
    Hyperparameter Transfer", arXiv:2203.03466, 2022
  """
  _validation.check_nonnegative(learning_rate=learning_rate, weight_decay=weight_decay)
  if roles is None:
    raise ValueError("mu_adamw: roles is None; expected a metaopt.mup.ParamRole tree or "
                     "a callable params -> roles (metaopt.mup.resolve_roles makes one).")
  return optax.chain(
      _factory.checked_roles(roles),
      scale_by_adam(b1, b2, eps, eps_root),
      optax.add_decayed_weights(weight_decay, mask),
      mup.scale_by_mup(roles),
      optax.scale_by_learning_rate(learning_rate),
  )


class ScaleByLionState(NamedTuple):
  """State of :func:`scale_by_lion`: step count and the momentum EMA."""

  count: jax.Array  # shape=(), dtype=int32.
  mu: Tree


def scale_by_lion(b1: float = 0.9, b2: float = 0.99) -> optax.GradientTransformation:
  """Lion's sign direction.

  .. math::

    u_t = \\operatorname{sign}(\\beta_1 m_{t-1} + (1-\\beta_1) g_t), \\qquad
    m_t = \\beta_2 m_{t-1} + (1-\\beta_2) g_t

  Args:
    b1: interpolation between momentum and gradient inside the sign.
    b2: decay of the momentum EMA.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`ScaleByLionState`.

  Example:
    >>> import jax.numpy as jnp
    >>> tx = scale_by_lion()
    >>> u, state = tx.update(jnp.ones(3), tx.init(jnp.zeros(3)))

  References:
    Chen et al, "Symbolic Discovery of Optimization Algorithms", arXiv:2302.06675, 2023
  """
  _validation.check_betas(b1=b1, b2=b2)

  def init_fn(params):
    return ScaleByLionState(jnp.zeros([], jnp.int32), optax.tree.zeros_like(params))

  def update_fn(updates, state, params=None):
    del params
    direction = jax.tree.map(
        jnp.sign, features.update_ema(updates=updates, moments=state.mu, decay=b1))
    mu = features.update_ema(updates=updates, moments=state.mu, decay=b2)
    return direction, ScaleByLionState(optax.safe_increment(state.count), mu)

  return optax.GradientTransformation(init_fn, update_fn)


def lion(learning_rate: optax.ScalarOrSchedule = 1e-4, b1: float = 0.9,
         b2: float = 0.99, weight_decay: optax.ScalarOrSchedule = 1e-3, *,
         mask: _factory.Mask = None) -> optax.GradientTransformationExtraArgs:
  """Lion with decoupled weight decay; equals ``optax.lion``.

  .. math::

    c_t = \\beta_1 m_{t-1} + (1-\\beta_1) g_t, \\quad
    \\theta_t = \\theta_{t-1} - \\eta_t (\\operatorname{sign}(c_t) + \\lambda
      \\theta_{t-1}), \\quad m_t = \\beta_2 m_{t-1} + (1-\\beta_2) g_t

  with :math:`\\eta` = ``learning_rate``, :math:`\\lambda` = ``weight_decay``.
  Lion's step has unit magnitude per coordinate: use a learning rate 3-10x smaller
  and a weight decay 3-10x larger than for AdamW.

  Args:
    learning_rate: step size, a float or an optax schedule.
    b1: interpolation between momentum and gradient inside the sign.
    b2: decay of the momentum EMA.
    weight_decay: decoupled weight decay (multiplied by the learning rate).
    mask: the leaves to decay, as ``optax.masked`` reads it (None: every leaf).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp
    >>> opt = lion(1e-4)
    >>> params = jnp.array([1.0, 2.0])
    >>> u, state = opt.update(2 * params, opt.init(params), params)

  References:
    Chen et al, "Symbolic Discovery of Optimization Algorithms", arXiv:2302.06675, 2023
  """
  return _factory.decayed_descent(scale_by_lion(b1, b2), learning_rate, weight_decay, mask)
