"""MARS-AdamW: variance-reduced (STORM-style) gradient correction fed into AdamW.

Yuan et al, "MARS: Unleashing the Power of Variance Reduction for Training Large
Models", arXiv:2411.10438, 2024.

This is MARS-approx (the official default, ``is_approx=True``): the previous step's
gradient stands in for the gradient of the current batch at the previous point.
Choices, relative to the official code (AGI-Arena/MARS, ``mars.py``):

* First step: we take ``g_0 := g_1``, so the first correction is zero -- the paper's
  Algorithm 1 sets ``x_1 = x_0``, which makes the exact correction vanish at ``t = 1``.
  The official approximate code starts ``last_grad`` at zeros, i.e. its first
  ``c_1 = (1 + gamma b1 / (1 - b1)) g_1`` before clipping (1.475 g_1 by default).
* Every leaf gets the MARS correction (official ``optimize_1d=True``); by default the
  official code corrects only 2-D tensors and runs plain AdamW with separate betas
  ``(0.9, 0.95)``, learning rate and weight decay on all other tensors.
* Clipping and the cached gradient are per tensor (pytree leaf), as in the code.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from metaopt import features
from metaopt.optimizers import _adam
from metaopt.optimizers import _factory
from metaopt.optimizers import _validation


class ScaleByMarsAdamwState(NamedTuple):
  """State of :func:`scale_by_mars_adamw`."""

  prev_grad: optax.Updates  # g_{t-1} (raw gradient).
  adam: _adam.ScaleByAdamState  # Adam's moments of the corrected gradients c_t.


def mars_correction(g, prev_grad, b1, gamma):
  """MARS's corrected gradient of one tensor, clipped to norm at most 1.

  c = g + gamma * b1 / (1 - b1) * (g - g_prev);  c <- c / max(||c||, 1).
  """
  c = g + gamma * (b1 / (1 - b1)) * (g - prev_grad)
  return c / jnp.maximum(features.tensor_norm(c), 1.0).astype(c.dtype)


def scale_by_mars_adamw(b1=0.95, b2=0.99, gamma=0.025, eps=1e-8
                        ) -> optax.GradientTransformation:
  r"""Rescales updates by MARS-AdamW (direction only, no learning rate or decay).

  .. math::
    c_t &= g_t + \gamma \frac{b_1}{1 - b_1} (g_t - g_{t-1}) \quad (g_0 := g_1), \qquad
    c_t \leftarrow c_t / \max(\|c_t\|, 1), \\
    m_t &= b_1 m_{t-1} + (1 - b_1) c_t, \quad v_t = b_2 v_{t-1} + (1 - b_2) c_t^2, \quad
    u_t = \frac{m_t / (1 - b_1^t)}{\sqrt{v_t / (1 - b_2^t)} + \epsilon},

  with norms per tensor (pytree leaf): :func:`metaopt.optimizers.scale_by_adam` applied
  to :math:`c_t`.

  Args:
    b1: first-moment decay; also sets the correction's scale :math:`b_1 / (1 - b_1)`.
    b2: second-moment decay.
    gamma: :math:`\gamma`, strength of the variance-reduction correction.
    eps: :math:`\epsilon` in the denominator.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`ScaleByMarsAdamwState`.

  Example:
    >>> import jax.numpy as jnp
    >>> tx = scale_by_mars_adamw()
    >>> state = tx.init({"w": jnp.zeros(3)})

  References:
    Yuan et al, "MARS: Unleashing the Power of Variance Reduction for Training Large
    Models", arXiv:2411.10438, 2024
  """
  _validation.check_nonnegative(gamma=gamma)
  adam = _adam.scale_by_adam(b1=b1, b2=b2, eps=eps)

  def init_fn(params):
    return ScaleByMarsAdamwState(prev_grad=optax.tree.zeros_like(params),
                                 adam=adam.init(params))

  def update_fn(updates, state, params=None):
    first = state.adam.count == 0
    prev = jax.tree.map(lambda g, p: jnp.where(first, g, p), updates, state.prev_grad)
    c = jax.tree.map(lambda g, p: mars_correction(g, p, b1, gamma), updates, prev)
    direction, adam_state = adam.update(c, state.adam, params)
    prev_grad = optax.tree.cast_like(updates, state.prev_grad)
    return direction, ScaleByMarsAdamwState(prev_grad=prev_grad, adam=adam_state)

  return optax.GradientTransformation(init_fn, update_fn)


def mars_adamw(learning_rate=3e-3, b1=0.95, b2=0.99, gamma=0.025, eps=1e-8,
               weight_decay=0.0, *, mask: _factory.Mask = None
               ) -> optax.GradientTransformation:
  r"""MARS-AdamW: AdamW on clipped, variance-reduced gradients.

  .. math::
    \theta_t = \theta_{t-1} - \eta \left(\frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon}
    + \lambda \theta_{t-1}\right),

  with the moments of the corrected gradient :math:`c_t` from
  :func:`scale_by_mars_adamw`, :math:`\eta` = ``learning_rate`` and :math:`\lambda`
  = ``weight_decay`` (decoupled, as in the official code).

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule.
    b1: first-moment decay.
    b2: second-moment decay.
    gamma: strength of the variance-reduction correction.
    eps: :math:`\epsilon` in the denominator.
    weight_decay: decoupled weight decay :math:`\lambda`.
    mask: the leaves to decay, as ``optax.masked`` reads it (None: every leaf).

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax.numpy as jnp
    >>> opt = mars_adamw()
    >>> params = {"w": jnp.ones(3)}
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": jnp.ones(3)}, state, params)

  References:
    Yuan et al, "MARS: Unleashing the Power of Variance Reduction for Training Large
    Models", arXiv:2411.10438, 2024
  """
  return _factory.decayed_descent(scale_by_mars_adamw(b1=b1, b2=b2, gamma=gamma, eps=eps),
                                  learning_rate, weight_decay, mask)
