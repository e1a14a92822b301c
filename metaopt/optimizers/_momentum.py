"""SGD with heavy-ball and Nesterov momentum.

``sgdm`` and ``nesterov`` equal ``optax.sgd(learning_rate, momentum, nesterov)`` when
``weight_decay = 0``; weight decay is decoupled (SGDW: added after the momentum, then
scaled by the learning rate), not an L2 term folded into the gradient.
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


class ScaleByMomentumState(NamedTuple):
  """State of :func:`scale_by_momentum`: step count and the momentum sum."""

  count: jax.Array  # shape=(), dtype=int32.
  momentum: Tree


def scale_by_momentum(momentum: float = 0.9, *,
                      nesterov: bool = False) -> optax.GradientTransformation:
  """Heavy-ball (or Nesterov) momentum direction, the sum form of ``optax.trace``.

  .. math::

    m_t = \\mu m_{t-1} + g_t, \\qquad
    u_t = m_t \\;\\text{(heavy ball)} \\quad\\text{or}\\quad u_t = g_t + \\mu m_t
    \\;\\text{(Nesterov)}.

  Args:
    momentum: the decay :math:`\\mu` of the momentum sum.
    nesterov: use the Nesterov look-ahead direction ``g + mu * m``.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`ScaleByMomentumState`.

  Example:
    >>> import jax.numpy as jnp
    >>> tx = scale_by_momentum(0.9)
    >>> u, state = tx.update(jnp.ones(3), tx.init(jnp.zeros(3)))

  References:
    Sutskever et al, "On the importance of initialization and momentum in deep
    learning", ICML, 2013
  """
  _validation.check_betas(momentum=momentum)

  def init_fn(params):
    return ScaleByMomentumState(jnp.zeros([], jnp.int32), optax.tree.zeros_like(params))

  def update_fn(updates, state, params=None):
    del params
    m = features.update_sum_momentum(state.momentum, updates, momentum)
    direction = features.update_sum_momentum(m, updates, momentum) if nesterov else m
    return direction, ScaleByMomentumState(optax.safe_increment(state.count), m)

  return optax.GradientTransformation(init_fn, update_fn)


def sgdm(learning_rate: optax.ScalarOrSchedule, momentum: float = 0.9,
         weight_decay: optax.ScalarOrSchedule = 0.0, *, nesterov: bool = False,
         mask: _factory.Mask = None) -> optax.GradientTransformationExtraArgs:
  """SGD with heavy-ball momentum and decoupled weight decay.

  .. math::

    m_t = \\mu m_{t-1} + g_t, \\qquad
    \\theta_{t} = \\theta_{t-1} - \\eta_t (m_t + \\lambda \\theta_{t-1})

  with :math:`\\eta` = ``learning_rate``, :math:`\\mu` = ``momentum``,
  :math:`\\lambda` = ``weight_decay``. With ``nesterov=True`` the direction is
  :math:`g_t + \\mu m_t`. Equals ``optax.sgd(learning_rate, momentum, nesterov)`` at
  ``weight_decay=0``.

  Args:
    learning_rate: step size, a float or an optax schedule.
    momentum: decay of the momentum sum, in [0, 1).
    weight_decay: decoupled weight decay (multiplied by the learning rate).
    nesterov: use Nesterov momentum (see :func:`nesterov`).
    mask: the leaves to decay, as ``optax.masked`` reads it (None: every leaf).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> opt = sgdm(0.1)
    >>> params = jnp.array([1.0, 2.0])
    >>> u, state = opt.update(2 * params, opt.init(params), params)
    >>> params = optax.apply_updates(params, u)

  References:
    Sutskever et al, "On the importance of initialization and momentum in deep
    learning", ICML, 2013
  """
  return _factory.decayed_descent(scale_by_momentum(momentum, nesterov=nesterov),
                                  learning_rate, weight_decay, mask)


def nesterov(learning_rate: optax.ScalarOrSchedule, momentum: float = 0.9,
             weight_decay: optax.ScalarOrSchedule = 0.0, *, mask: _factory.Mask = None
             ) -> optax.GradientTransformationExtraArgs:
  """SGD with Nesterov momentum and decoupled weight decay.

  .. math::

    m_t = \\mu m_{t-1} + g_t, \\qquad
    \\theta_{t} = \\theta_{t-1} - \\eta_t (g_t + \\mu m_t + \\lambda \\theta_{t-1})

  Equals ``optax.sgd(learning_rate, momentum, nesterov=True)`` at ``weight_decay=0``.

  Args:
    learning_rate: step size :math:`\\eta`, a float or an optax schedule.
    momentum: decay :math:`\\mu` of the momentum sum, in [0, 1).
    weight_decay: decoupled weight decay :math:`\\lambda` (multiplied by the
      learning rate).
    mask: the leaves to decay, as ``optax.masked`` reads it (None: every leaf).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp
    >>> opt = nesterov(0.1)
    >>> params = jnp.array([1.0, 2.0])
    >>> u, state = opt.update(2 * params, opt.init(params), params)

  References:
    Sutskever et al, "On the importance of initialization and momentum in deep
    learning", ICML, 2013
  """
  return sgdm(learning_rate, momentum, weight_decay, nesterov=True, mask=mask)
