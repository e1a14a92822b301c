"""Cautious optimizers: mask the coordinates where the update disagrees with the gradient.

Liang et al, "Cautious Optimizers: Improving Training with One Line of Code",
arXiv:2411.16085, 2024.

The mask is a generic wrapper (the paper's point): :func:`scale_by_cautious` wraps any
direction-only ``scale_by_*`` transform, and :func:`cautious` adds decoupled weight decay
and the learning rate *after* the mask, so the mask never sees the decay term.

Relation to the reference code (kyleliang919/C-Optim, ``c_adamw.py``): it decays first,
``p <- p (1 - lr wd)``, then steps ``p <- p - lr * phi * m_hat / (sqrt(v_hat) + eps)``.
The Adam step does not depend on ``p``, so this equals optax's
``-lr * (phi * u + wd * p_old)``, which is what we compute: decoupled decay is not masked
either way. Two deliberate differences, both following the reference sheet: the mask is
renormalized by ``1 / max(mean(phi), 1e-3)`` (the reference uses ``numel / (sum + 1)``),
and C-AdamW uses Adam's denominator ``sqrt(v_hat) + eps`` of
:func:`metaopt.optimizers.scale_by_adam` (equal to optax's; the reference adds ``eps``
before bias correction, HuggingFace-style).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax

from metaopt import features
from metaopt.optimizers import _adam
from metaopt.optimizers import _factory


class ScaleByCautiousState(NamedTuple):
  """State of :func:`scale_by_cautious`: the wrapped transform's state, unchanged."""

  inner_state: optax.OptState


def scale_by_cautious(base: optax.GradientTransformation
                      ) -> optax.GradientTransformationExtraArgs:
  r"""Masks a direction-only transform where its update disagrees in sign with the gradient.

  .. math::
    u_t = \mathrm{base}(g_t), \quad
    \phi_t = \frac{\mathbb{1}[u_t \odot g_t > 0]}{\max(\mathrm{mean}(\mathbb{1}[u_t \odot g_t > 0]),
    10^{-3})}, \quad \text{update} = u_t \odot \phi_t,

  with the mean taken per tensor (pytree leaf), see :func:`metaopt.features.cautious_mask`.
  Extra keyword arguments of ``update`` (e.g. ``value=loss``) are passed to ``base``.

  Args:
    base: a direction-only transform (no learning rate, no weight decay), e.g.
      ``optax.scale_by_adam()`` or ``optax.scale_by_lion()``. Its sign convention must
      be the gradient's (descent happens later, in ``scale_by_learning_rate``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`ScaleByCautiousState`.

  Example:
    >>> import optax
    >>> import jax.numpy as jnp
    >>> tx = scale_by_cautious(optax.scale_by_adam())
    >>> state = tx.init({"w": jnp.zeros(3)})

  References:
    Liang et al, "Cautious Optimizers: Improving Training with One Line of Code",
    arXiv:2411.16085, 2024
  """
  base = optax.with_extra_args_support(base)

  def init_fn(params):
    return ScaleByCautiousState(inner_state=base.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    direction, inner_state = base.update(updates, state.inner_state, params, **extra_args)
    masked = jax.tree.map(lambda u, g: u * features.cautious_mask(u, g), direction, updates)
    return masked, ScaleByCautiousState(inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def cautious(base: optax.GradientTransformation, learning_rate, weight_decay=0.0, *,
             mask: _factory.Mask = None) -> optax.GradientTransformationExtraArgs:
  r"""Makes any momentum optimizer cautious: mask its direction, then decay and step.

  .. math::
    \theta_t = \theta_{t-1} - \eta \left(u_t \odot \phi_t + \lambda \theta_{t-1}\right),

  with :math:`u_t \odot \phi_t` from :func:`scale_by_cautious`, :math:`\eta` =
  ``learning_rate`` and :math:`\lambda` = ``weight_decay``. The decay term is added
  after the cautious mask, which never applies to it (``mask`` selects the decayed leaves).

  Args:
    base: a direction-only transform (``scale_by_*``: no learning rate, no decay).
    learning_rate: :math:`\eta`, a float or an optax schedule.
    weight_decay: decoupled weight decay :math:`\lambda`.
    mask: the leaves to decay, as ``optax.masked`` reads it (None: every leaf).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; extra ``update`` keyword arguments
    reach ``base``.

  Example:
    >>> import optax
    >>> import jax.numpy as jnp
    >>> opt = cautious(optax.scale_by_adam(), learning_rate=1e-3, weight_decay=1e-4)
    >>> params = {"w": jnp.ones(3)}
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": jnp.ones(3)}, state, params)

  References:
    Liang et al, "Cautious Optimizers: Improving Training with One Line of Code",
    arXiv:2411.16085, 2024
  """
  return _factory.decayed_descent(scale_by_cautious(base), learning_rate, weight_decay, mask)


def cautious_adamw(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4, *,
                   mask: _factory.Mask = None) -> optax.GradientTransformationExtraArgs:
  r"""C-AdamW: AdamW whose direction is masked by its agreement with the gradient.

  .. math::
    \theta_t = \theta_{t-1} - \eta \left(\frac{\hat m_t \odot \phi_t}{\sqrt{\hat v_t}
    + \epsilon} + \lambda \theta_{t-1}\right),

  with Adam's bias-corrected moments :math:`\hat m_t, \hat v_t` (``b1``, ``b2``) and
  the mask :math:`\phi_t` of :func:`scale_by_cautious` (the sign of
  :math:`\hat m_t / (\sqrt{\hat v_t} + \epsilon)` is that of :math:`m_t`, as in the
  paper's ``m * g > 0``). Decoupled decay is equivalent to the paper's "decay first".

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule.
    b1: first-moment decay.
    b2: second-moment decay.
    eps: :math:`\epsilon` in the denominator.
    weight_decay: decoupled weight decay :math:`\lambda` (not cautious-masked).
    mask: the leaves to decay, as ``optax.masked`` reads it (None: every leaf).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp
    >>> opt = cautious_adamw(learning_rate=1e-3)
    >>> params = {"w": jnp.ones(3)}
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": jnp.ones(3)}, state, params)

  References:
    Liang et al, "Cautious Optimizers: Improving Training with One Line of Code",
    arXiv:2411.16085, 2024
  """
  return cautious(_adam.scale_by_adam(b1=b1, b2=b2, eps=eps), learning_rate, weight_decay,
                  mask=mask)


def cautious_lion(learning_rate=1e-4, b1=0.9, b2=0.99, weight_decay=1e-3, *,
                  mask: _factory.Mask = None) -> optax.GradientTransformationExtraArgs:
  r"""C-Lion: Lion whose sign update is masked by its agreement with the gradient.

  .. math::
    u_t = \mathrm{sign}(b_1 m_{t-1} + (1 - b_1) g_t), \quad
    \theta_t = \theta_{t-1} - \eta (u_t \odot \phi_t + \lambda \theta_{t-1}), \quad
    m_t = b_2 m_{t-1} + (1 - b_2) g_t,

  with the mask :math:`\phi_t` of :func:`scale_by_cautious`.

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule.
    b1: interpolation between momentum and gradient inside the sign.
    b2: momentum decay.
    weight_decay: decoupled weight decay :math:`\lambda` (not cautious-masked).
    mask: the leaves to decay, as ``optax.masked`` reads it (None: every leaf).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp
    >>> opt = cautious_lion(learning_rate=1e-4)
    >>> params = {"w": jnp.ones(3)}
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": jnp.ones(3)}, state, params)

  References:
    Liang et al, "Cautious Optimizers: Improving Training with One Line of Code",
    arXiv:2411.16085, 2024
  """
  return cautious(_adam.scale_by_lion(b1=b1, b2=b2), learning_rate, weight_decay, mask=mask)
