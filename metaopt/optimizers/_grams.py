"""Grams: gradient descent with adaptive momentum scaling.

Cao et al, "Grams: Gradient Descent with Adaptive Momentum Scaling", arXiv:2412.17107,
2024.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from metaopt import features
from metaopt.optimizers import _validation


class ScaleByGramsState(NamedTuple):
  """State of :func:`scale_by_grams`."""

  count: jax.Array  # int32 scalar, number of updates applied.
  mu: optax.Updates  # first-moment EMA.
  nu: optax.Updates  # second-moment EMA.


def scale_by_grams(b1=0.9, b2=0.999, eps=1e-6) -> optax.GradientTransformation:
  r"""Rescales updates by Grams: Adam's magnitude with the current gradient's sign.

  .. math::
    \hat m_t = \frac{m_t}{1 - b_1^t}, \quad \hat v_t = \frac{v_t}{1 - b_2^t}, \quad
    u_t = \mathrm{sign}(g_t) \odot \left|\frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon}\right|,

  with Adam's EMAs :math:`m_t, v_t` of :math:`g_t, g_t^2`.

  Args:
    b1: first-moment decay.
    b2: second-moment decay.
    eps: :math:`\epsilon` in the denominator (1e-6 as in the reference code).

  Returns:
    An ``optax.GradientTransformation`` with state :class:`ScaleByGramsState`.

  Example:
    >>> import jax.numpy as jnp
    >>> tx = scale_by_grams()
    >>> state = tx.init({"w": jnp.zeros(3)})

  References:
    Cao et al, "Grams: Gradient Descent with Adaptive Momentum Scaling",
    arXiv:2412.17107, 2024
  """
  _validation.check_beta("b1", b1)
  _validation.check_beta("b2", b2)
  _validation.check_nonnegative("eps", eps)

  def init_fn(params):
    return ScaleByGramsState(count=jnp.zeros([], jnp.int32), mu=optax.tree.zeros_like(params),
                             nu=optax.tree.zeros_like(params))

  def update_fn(updates, state, params=None):
    del params
    mu = features.update_ema(state.mu, updates, b1)
    nu = features.update_second_moment(state.nu, updates, b2)
    count = optax.safe_increment(state.count)
    adam = features.adam_direction(features.bias_correction(mu, b1, count),
                                   features.bias_correction(nu, b2, count), eps)
    direction = jax.tree.map(lambda u, g: jnp.sign(g) * jnp.abs(u), adam, updates)
    mu = optax.tree.cast_like(mu, state.mu)
    nu = optax.tree.cast_like(nu, state.nu)
    return direction, ScaleByGramsState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def grams(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.0
          ) -> optax.GradientTransformation:
  r"""Grams: Adam whose update takes its sign from the current gradient, decoupled decay.

  .. math::
    \theta_t = \theta_{t-1} - \eta \left(\mathrm{sign}(g_t) \odot
    \left|\frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon}\right| + \lambda \theta_{t-1}\right),

  with :math:`\eta` = ``learning_rate`` and :math:`\lambda` = ``weight_decay``.

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule.
    b1: first-moment decay.
    b2: second-moment decay.
    eps: :math:`\epsilon` in the denominator.
    weight_decay: decoupled weight decay :math:`\lambda`.

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax.numpy as jnp
    >>> opt = grams(learning_rate=1e-3)
    >>> params = {"w": jnp.ones(3)}
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": jnp.ones(3)}, state, params)

  References:
    Cao et al, "Grams: Gradient Descent with Adaptive Momentum Scaling",
    arXiv:2412.17107, 2024
  """
  _validation.check_learning_rate(learning_rate)
  _validation.check_nonnegative("weight_decay", weight_decay)
  return optax.chain(
      scale_by_grams(b1=b1, b2=b2, eps=eps),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  )
