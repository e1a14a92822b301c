"""Grams: gradient descent with adaptive momentum scaling.

Cao et al, "Grams: Gradient Descent with Adaptive Momentum Scaling", arXiv:2412.17107,
2024.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from metaopt.optimizers import _adam
from metaopt.optimizers import _factory


def scale_by_grams(b1=0.9, b2=0.999, eps=1e-6) -> optax.GradientTransformation:
  r"""Rescales updates by Grams: Adam's magnitude with the current gradient's sign.

  .. math::
    \hat m_t = \frac{m_t}{1 - b_1^t}, \quad \hat v_t = \frac{v_t}{1 - b_2^t}, \quad
    u_t = \mathrm{sign}(g_t) \odot \left|\frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon}\right|,

  with Adam's EMAs :math:`m_t, v_t` of :math:`g_t, g_t^2`
  (:func:`metaopt.optimizers.scale_by_adam`, whose state it keeps).

  Args:
    b1: first-moment decay.
    b2: second-moment decay.
    eps: :math:`\epsilon` in the denominator (1e-6 as in the reference code).

  Returns:
    An ``optax.GradientTransformation`` with state
    :class:`metaopt.optimizers.ScaleByAdamState`.

  Example:
    >>> import jax.numpy as jnp
    >>> tx = scale_by_grams()
    >>> state = tx.init({"w": jnp.zeros(3)})

  References:
    Cao et al, "Grams: Gradient Descent with Adaptive Momentum Scaling",
    arXiv:2412.17107, 2024
  """
  adam = _adam.scale_by_adam(b1=b1, b2=b2, eps=eps)

  def update_fn(updates, state, params=None):
    direction, state = adam.update(updates, state, params)
    return jax.tree.map(lambda u, g: jnp.sign(g) * jnp.abs(u), direction, updates), state

  return optax.GradientTransformation(adam.init, update_fn)


def grams(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.0, *,
          mask: _factory.Mask = None) -> optax.GradientTransformation:
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
    mask: the leaves to decay, as ``optax.masked`` reads it (None: every leaf).

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
  return _factory.decayed_descent(scale_by_grams(b1=b1, b2=b2, eps=eps), learning_rate,
                                  weight_decay, mask)
