"""Adan: adaptive Nesterov momentum, in the paper's (and official code's) form.

Xie et al, "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep
Models", arXiv:2208.06677, 2022.

Deviation from ``optax.adan`` (0.2.8), on purpose: optax weights the gradient-difference
term by ``1 - b2`` (in the step and inside ``n``) where the paper and the official code
(sail-sg/Adan) use ``b2``, so the two diverge from step 2 on; and optax decays weights
AdamW-style where Adan uses the proximal step ``theta <- (theta - eta u) / (1 + eta lam)``
(the official default, ``no_prox=False``). Both betas follow the official code convention
(``m <- b1 m + (1 - b1) g``, defaults 0.98, 0.92, 0.99).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from metaopt import features
from metaopt.optimizers import _factory
from metaopt.optimizers import _validation


class ScaleByAdanState(NamedTuple):
  """State of :func:`scale_by_adan`."""

  count: jax.Array  # int32 scalar, number of updates applied.
  mu: optax.Updates  # m: EMA of the gradients.
  delta: optax.Updates  # v: EMA of the gradient differences g_t - g_{t-1}.
  nu: optax.Updates  # n: EMA of (g_t + b2 (g_t - g_{t-1}))^2.
  prev_grad: optax.Updates  # g_{t-1}.


class ProximalDecayState(NamedTuple):
  """State of :func:`proximal_decay_step` (the learning-rate schedule's step)."""

  count: jax.Array


def scale_by_adan(b1=0.98, b2=0.92, b3=0.99, eps=1e-8) -> optax.GradientTransformation:
  r"""Rescales updates by Adan (paper form; direction only, no learning rate or decay).

  .. math::
    \Delta_t &= g_t - g_{t-1} \quad (\Delta_1 = 0), \\
    m_t &= b_1 m_{t-1} + (1 - b_1) g_t, \quad
    v_t = b_2 v_{t-1} + (1 - b_2) \Delta_t, \\
    n_t &= b_3 n_{t-1} + (1 - b_3) (g_t + b_2 \Delta_t)^2, \\
    u_t &= \frac{m_t / (1 - b_1^t) + b_2 v_t / (1 - b_2^t)}{\sqrt{n_t / (1 - b_3^t)}
    + \epsilon}.

  Args:
    b1: gradient EMA decay.
    b2: gradient-difference EMA decay, also the difference's weight (paper: ``b2``;
      optax uses ``1 - b2`` there).
    b3: second-moment decay.
    eps: :math:`\epsilon` in the denominator.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`ScaleByAdanState`.

  Example:
    >>> import jax.numpy as jnp
    >>> tx = scale_by_adan()
    >>> state = tx.init({"w": jnp.zeros(3)})

  References:
    Xie et al, "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep
    Models", arXiv:2208.06677, 2022
  """
  _validation.check_betas(b1=b1, b2=b2, b3=b3)
  _validation.check_positive(eps=eps)

  def init_fn(params):
    zeros = optax.tree.zeros_like(params)
    return ScaleByAdanState(count=jnp.zeros([], jnp.int32), mu=zeros, delta=zeros, nu=zeros,
                            prev_grad=zeros)

  def update_fn(updates, state, params=None):
    del params
    first = state.count == 0
    diff = jax.tree.map(lambda g, p: jnp.where(first, jnp.zeros_like(g), g - p), updates,
                        state.prev_grad)
    mu = features.update_ema(updates=updates, moments=state.mu, decay=b1)
    delta = features.update_ema(updates=diff, moments=state.delta, decay=b2)
    nesterov_grad = jax.tree.map(lambda g, d: g + b2 * d, updates, diff)
    nu = features.update_second_moment(state.nu, nesterov_grad, b3)
    count = optax.safe_increment(state.count)
    numerator = jax.tree.map(lambda m, v: m + b2 * v, features.bias_correction(mu, b1, count),
                             features.bias_correction(delta, b2, count))
    direction = features.adam_direction(numerator, features.bias_correction(nu, b3, count),
                                        eps)
    new_state = ScaleByAdanState(count=count, mu=optax.tree.cast_like(mu, state.mu),
                                 delta=optax.tree.cast_like(delta, state.delta),
                                 nu=optax.tree.cast_like(nu, state.nu),
                                 prev_grad=optax.tree.cast_like(updates, state.prev_grad))
    return direction, new_state

  return optax.GradientTransformation(init_fn, update_fn)


def proximal_decay_step(learning_rate, weight_decay=0.0, *, mask: _factory.Mask = None
                        ) -> optax.GradientTransformation:
  r"""Final descent step with proximal (not AdamW-style) weight decay.

  .. math::
    \theta_t = \frac{\theta_{t-1} - \eta_t u_t}{1 + \eta_t \lambda}
    \quad\Longleftrightarrow\quad
    \text{update} = -\frac{\eta_t (u_t + \lambda \theta_{t-1})}{1 + \eta_t \lambda},

  where :math:`u_t` is the incoming direction, :math:`\eta_t` the learning rate
  (schedules are evaluated at the 0-based step, as ``optax.scale_by_learning_rate``
  does) and :math:`\lambda` = ``weight_decay`` on the leaves ``mask`` selects (0 on
  the others). With :math:`\lambda = 0` it equals
  ``optax.scale_by_learning_rate(learning_rate)``.

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule.
    weight_decay: :math:`\lambda`.
    mask: the leaves to decay, as ``optax.masked`` reads it (None: every leaf).

  Returns:
    An ``optax.GradientTransformation`` with state :class:`ProximalDecayState`; it
    needs ``params`` unless ``weight_decay`` is the constant 0.
  """
  _validation.check_nonnegative(learning_rate=learning_rate, weight_decay=weight_decay)
  no_decay = isinstance(weight_decay, (int, float)) and weight_decay == 0

  def init_fn(params):
    del params
    return ProximalDecayState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    eta = learning_rate(state.count) if callable(learning_rate) else learning_rate
    new_state = ProximalDecayState(count=optax.safe_increment(state.count))
    if no_decay:
      return jax.tree.map(lambda u: (-eta * u).astype(u.dtype), updates), new_state
    params = _validation.require_params(params, "adan (proximal weight decay)")
    shrink = 1 + eta * weight_decay

    def leaf(u, p, decayed):
      if not decayed:
        return (-eta * u).astype(u.dtype)
      return (-eta * (u + weight_decay * p) / shrink).astype(u.dtype)

    out = jax.tree.map(leaf, updates, params, _factory.decayed_leaves(mask, params))
    return out, new_state

  return optax.GradientTransformation(init_fn, update_fn)


def adan(learning_rate=1e-3, b1=0.98, b2=0.92, b3=0.99, eps=1e-8, weight_decay=0.0, *,
         mask: _factory.Mask = None) -> optax.GradientTransformation:
  r"""Adan (paper form): Nesterov-style gradient-difference momentum, proximal decay.

  .. math::
    \theta_t = \frac{\theta_{t-1} - \eta\, u_t}{1 + \eta \lambda},

  with :math:`u_t` from :func:`scale_by_adan` (``b2`` on the gradient-difference term),
  :math:`\eta` = ``learning_rate`` and :math:`\lambda` = ``weight_decay``. This is the
  paper's Algorithm 1 and the official code's default; it differs from ``optax.adan``
  (``1 - b2`` on the difference term, AdamW-style decay) from step 2 on.

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule.
    b1: gradient EMA decay.
    b2: gradient-difference EMA decay and weight.
    b3: second-moment decay.
    eps: :math:`\epsilon` in the denominator.
    weight_decay: proximal weight decay :math:`\lambda` (needs ``params``).
    mask: the leaves to decay, as ``optax.masked`` reads it (None: every leaf).

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax.numpy as jnp
    >>> opt = adan(learning_rate=1e-3, weight_decay=0.02)
    >>> params = {"w": jnp.ones(3)}
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": jnp.ones(3)}, state, params)

  References:
    Xie et al, "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep
    Models", arXiv:2208.06677, 2022
  """
  _validation.check_nonnegative(learning_rate=learning_rate, weight_decay=weight_decay)
  return optax.chain(
      scale_by_adan(b1=b1, b2=b2, b3=b3, eps=eps),
      proximal_decay_step(learning_rate, weight_decay, mask=mask),
  )
