"""AdEMAMix: Adam with a mixture of a fast and a slow momentum EMA.

Equals ``optax.contrib.ademamix`` (alpha default 5 as there; optax's
``scale_by_ademamix`` defaults to 6). The paper's alpha and beta3 warmup schedulers
(``t_alpha``, ``t_beta3``) are built in, from :func:`metaopt.features.ademamix_alpha`
and :func:`metaopt.features.ademamix_beta3`.
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


class ScaleByAdemamixState(NamedTuple):
  """State of :func:`scale_by_ademamix`: count, fast EMA, slow EMA, second moment."""

  count: jax.Array  # shape=(), dtype=int32.
  m1: Tree
  m2: Tree
  nu: Tree


def _schedule_or_scheduler(name, value, horizon, scheduler):
  """Returns ``count -> value`` from a schedule, the paper's scheduler or a constant.

  A constant stays a Python float, so ``1 - b3`` keeps full precision in float32.
  """
  if callable(value):
    if horizon is not None:
      raise ValueError(f"{name} is a schedule and t_{name} is set; give one of the two.")
    return value
  if horizon is None:
    return lambda count: value
  return lambda count: scheduler(count, value, horizon)


def scale_by_ademamix(b1: float = 0.9, b2: float = 0.999, b3=0.9999, alpha=5.0,
                      eps: float = 1e-8, t_alpha: int | None = None,
                      t_beta3: int | None = None) -> optax.GradientTransformation:
  """AdEMAMix direction: bias-corrected fast EMA plus alpha times the slow EMA.

  .. math::

    m_1 \\leftarrow \\beta_1 m_1 + (1-\\beta_1) g, \\quad
    m_2 \\leftarrow \\beta_3(k) m_2 + (1-\\beta_3(k)) g, \\quad
    \\nu \\leftarrow \\beta_2 \\nu + (1-\\beta_2) g^2, \\\\
    u = \\frac{m_1/(1-\\beta_1^t) + \\alpha(k) m_2}{\\sqrt{\\nu/(1-\\beta_2^t)} + \\epsilon},
    \\quad \\alpha(k) = \\min(k/T_\\alpha, 1)\\,\\alpha, \\quad
    \\beta_3(k) = \\exp\\Big(\\frac{\\ln\\beta_1 \\ln\\beta_3}{(1-a)\\ln\\beta_3 +
      a\\ln\\beta_1}\\Big),\\ a = \\min(k/T_{\\beta_3}, 1)

  The schedulers are evaluated at the 0-based count ``k = t - 1`` (the number of
  updates already applied), as optax evaluates schedules; without ``t_alpha`` /
  ``t_beta3`` alpha and beta3 are constant. The slow EMA has no bias correction.

  Args:
    b1: decay :math:`\\beta_1` of the fast EMA (also the scheduler's start for beta3).
    b2: decay :math:`\\beta_2` of the second moment.
    b3: final decay :math:`\\beta_3` of the slow EMA (or a schedule ``count -> b3``).
    alpha: final weight :math:`\\alpha` of the slow EMA (or a schedule).
    eps: added to the denominator outside the square root.
    t_alpha: warmup horizon :math:`T_\\alpha` of alpha, in steps (None: constant).
    t_beta3: warmup horizon :math:`T_{\\beta_3}` of beta3, in steps (None: constant).

  Returns:
    An ``optax.GradientTransformation`` with state :class:`ScaleByAdemamixState`.

  Example:
    >>> import jax.numpy as jnp
    >>> tx = scale_by_ademamix(t_alpha=1000, t_beta3=1000)
    >>> u, state = tx.update(jnp.ones(3), tx.init(jnp.zeros(3)))

  References:
    Pagliardini et al, "The AdEMAMix Optimizer: Better, Faster, Older",
    arXiv:2409.03137, 2024
  """
  _validation.check_betas(b1=b1, b2=b2, b3=b3)
  _validation.check_nonnegative(alpha=alpha)
  _validation.check_positive(eps=eps)
  for name, horizon in (("t_alpha", t_alpha), ("t_beta3", t_beta3)):
    if horizon is not None:
      _validation.check_positive(**{name: horizon})
  alpha_at = _schedule_or_scheduler("alpha", alpha, t_alpha, features.ademamix_alpha)
  b3_at = _schedule_or_scheduler(
      "beta3", b3, t_beta3,
      lambda count, b, horizon: features.ademamix_beta3(count, b1, b, horizon))

  def init_fn(params):
    zeros = optax.tree.zeros_like(params)
    return ScaleByAdemamixState(jnp.zeros([], jnp.int32), zeros, zeros, zeros)

  def update_fn(updates, state, params=None):
    del params
    m1 = features.update_ema(updates=updates, moments=state.m1, decay=b1)
    m2 = features.update_ema(updates=updates, moments=state.m2, decay=b3_at(state.count))
    nu = features.update_second_moment(state.nu, updates, b2)
    count = optax.safe_increment(state.count)
    direction = features.ademamix_direction(
        features.bias_correction(m1, b1, count), m2,
        features.bias_correction(nu, b2, count), alpha_at(state.count), eps)
    return direction, ScaleByAdemamixState(count, m1, m2, nu)

  return optax.GradientTransformation(init_fn, update_fn)


def ademamix(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
             b3=0.9999, alpha=5.0, eps: float = 1e-8,
             weight_decay: optax.ScalarOrSchedule = 0.0, t_alpha: int | None = None,
             t_beta3: int | None = None, *, mask: _factory.Mask = None
             ) -> optax.GradientTransformationExtraArgs:
  """AdEMAMix with decoupled weight decay; equals ``optax.contrib.ademamix``.

  .. math::

    \\theta_t = \\theta_{t-1} - \\eta_t \\left(\\frac{\\hat m_1 + \\alpha(k) m_2}
      {\\sqrt{\\hat\\nu} + \\epsilon} + \\lambda \\theta_{t-1}\\right)

  with the moments and schedulers of :func:`scale_by_ademamix`, :math:`\\eta` =
  ``learning_rate`` and :math:`\\lambda` = ``weight_decay`` (multiplied by the learning
  rate). Schedulers are evaluated at the 0-based count, as optax evaluates the
  schedules ``alpha(count)`` and ``b3(count)``; passing those optax the schedules
  ``lambda k: features.ademamix_alpha(k, alpha, t_alpha)`` and
  ``lambda k: features.ademamix_beta3(k, b1, b3, t_beta3)`` gives the same updates.
  The paper recommends ``t_alpha = t_beta3 =`` the number of training steps.

  Args:
    learning_rate: step size, a float or an optax schedule.
    b1: decay of the fast EMA.
    b2: decay of the second moment.
    b3: final decay of the slow EMA (or a schedule).
    alpha: final weight of the slow EMA (or a schedule); 5 as in optax (paper: 8).
    eps: added to the denominator outside the square root.
    weight_decay: decoupled weight decay.
    t_alpha: warmup horizon of alpha, in steps (None: constant).
    t_beta3: warmup horizon of beta3, in steps (None: constant).
    mask: the leaves to decay, as ``optax.masked`` reads it (None: every leaf).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp
    >>> opt = ademamix(1e-3, t_alpha=10_000, t_beta3=10_000)
    >>> params = jnp.array([1.0, 2.0])
    >>> u, state = opt.update(2 * params, opt.init(params), params)

  References:
    Pagliardini et al, "The AdEMAMix Optimizer: Better, Faster, Older",
    arXiv:2409.03137, 2024
  """
  return _factory.decayed_descent(scale_by_ademamix(b1, b2, b3, alpha, eps, t_alpha, t_beta3),
                                  learning_rate, weight_decay, mask)
