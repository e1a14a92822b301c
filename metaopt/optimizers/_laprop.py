"""LaProp: normalize the gradient first, then take momentum.

Ziyin et al, "LaProp: Separating Momentum and Adaptivity in Adam", arXiv:2002.04839,
2020.

Relation to the official code (Z-T-WANG/LaProp-Optimizer): it folds the learning rate
into the momentum (``m <- b1 m + (1 - b1) lr n`` and a learning-rate-weighted bias
correction) so that schedules act inside the momentum; we apply the learning rate after
the momentum, as optax does. The two agree exactly for a constant learning rate. Its
weight decay is ``p <- p - wd * p`` after the step, not scaled by the learning rate; we
use decoupled AdamW-style decay ``lr * wd * p_old`` like every optimizer here.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from metaopt import features
from metaopt.optimizers import _factory
from metaopt.optimizers import _validation


class ScaleByLapropState(NamedTuple):
  """State of :func:`scale_by_laprop`."""

  count: jax.Array  # int32 scalar, number of updates applied.
  mu: optax.Updates  # EMA of the normalized gradients.
  nu: optax.Updates  # second-moment EMA of the raw gradients.


def scale_by_laprop(b1=0.9, b2=0.999, eps=1e-15) -> optax.GradientTransformation:
  r"""Rescales updates by LaProp (direction only, no learning rate).

  .. math::
    v_t = b_2 v_{t-1} + (1 - b_2) g_t^2, \quad
    n_t = \frac{g_t}{\sqrt{v_t / (1 - b_2^t)} + \epsilon}, \quad
    m_t = b_1 m_{t-1} + (1 - b_1) n_t, \quad u_t = \frac{m_t}{1 - b_1^t}.

  Args:
    b1: momentum decay of the normalized gradients.
    b2: second-moment decay.
    eps: :math:`\epsilon` in the normalization.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`ScaleByLapropState`.

  Example:
    >>> import jax.numpy as jnp
    >>> tx = scale_by_laprop()
    >>> state = tx.init({"w": jnp.zeros(3)})

  References:
    Ziyin et al, "LaProp: Separating Momentum and Adaptivity in Adam",
    arXiv:2002.04839, 2020
  """
  _validation.check_betas(b1=b1, b2=b2)
  _validation.check_positive(eps=eps)

  def init_fn(params):
    return ScaleByLapropState(count=jnp.zeros([], jnp.int32), mu=optax.tree.zeros_like(params),
                              nu=optax.tree.zeros_like(params))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    nu = features.update_second_moment(state.nu, updates, b2)
    normalized = features.adam_direction(updates, features.bias_correction(nu, b2, count),
                                         eps)
    mu = features.update_ema(updates=normalized, moments=state.mu, decay=b1)
    direction = features.bias_correction(mu, b1, count)
    mu = optax.tree.cast_like(mu, state.mu)
    nu = optax.tree.cast_like(nu, state.nu)
    return direction, ScaleByLapropState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def laprop(learning_rate=4e-4, b1=0.9, b2=0.999, eps=1e-15, weight_decay=0.0, *,
           mask: _factory.Mask = None) -> optax.GradientTransformation:
  r"""LaProp: momentum over Adam-normalized gradients, decoupled weight decay.

  .. math::
    \theta_t = \theta_{t-1} - \eta \left(\frac{m_t}{1 - b_1^t} + \lambda \theta_{t-1}\right),

  with :math:`m_t` the EMA of :math:`g_t / (\sqrt{\hat v_t} + \epsilon)` from
  :func:`scale_by_laprop`, :math:`\eta` = ``learning_rate`` (default 4e-4, the paper's
  and official code's default) and :math:`\lambda` = ``weight_decay``.

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule.
    b1: momentum decay.
    b2: second-moment decay.
    eps: :math:`\epsilon` in the normalization.
    weight_decay: decoupled weight decay :math:`\lambda`.
    mask: the leaves to decay, as ``optax.masked`` reads it (None: every leaf).

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax.numpy as jnp
    >>> opt = laprop()
    >>> params = {"w": jnp.ones(3)}
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": jnp.ones(3)}, state, params)

  References:
    Ziyin et al, "LaProp: Separating Momentum and Adaptivity in Adam",
    arXiv:2002.04839, 2020
  """
  return _factory.decayed_descent(scale_by_laprop(b1=b1, b2=b2, eps=eps), learning_rate,
                                  weight_decay, mask)
