"""AdamP and SGDP: remove the radial component of updates on scale-invariant weights.

Heo et al, "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
Scale-invariant Weights", arXiv:2006.08217, 2020.

Semantics follow the official code (clovaai/AdamP, ``adamp/adamp.py``, ``adamp/sgdp.py``):

* only leaves with ``ndim > 1`` are tested; the test uses the raw gradient and the
  parameter, first in the channel view ``reshape(shape[0], -1)``, then (only if the
  channel view fails) in the layer view ``reshape(1, -1)``;
* a view passes when ``max |cos(g_i, theta_i)| < delta / sqrt(view row size)``; then the
  update loses its component along each normalized row ``theta_i / (||theta_i|| + eps)``
  and the weight decay is multiplied by ``wd_ratio``;
* cosines are PyTorch's ``F.cosine_similarity``: each norm clamped below by ``eps``;
* decay is decoupled and uses the old parameters (``p *= 1 - lr wd ratio`` before the
  step); SGDP divides it by ``1 - momentum`` as the official code does.

Because the decay ratio depends on the projection test, the ``scale_by_*`` transforms
here take ``weight_decay`` and add the (scaled) decay term themselves; with the default
``weight_decay=0`` they are direction-only. Both need ``params``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from metaopt import features
from metaopt.optimizers import _factory
from metaopt.optimizers import _validation


class ScaleByAdampState(NamedTuple):
  """State of :func:`scale_by_adamp`."""

  count: jax.Array  # int32 scalar, number of updates applied.
  mu: optax.Updates  # first-moment EMA.
  nu: optax.Updates  # second-moment EMA.


class ScaleBySgdpState(NamedTuple):
  """State of :func:`scale_by_sgdp`."""

  momentum: optax.Updates  # heavy-ball buffer.


# The two views are reductions over axes (all but the first: the channel view's rows;
# all: the layer view's one row), not reshapes: explicitly sharded arrays refuse
# a reshape that merges a sharded axis.


def _norm(x, axes):
  """Euclidean norm over ``axes``, kept as size-1 axes."""
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=axes, keepdims=True))


def _abs_cosine_max(g, p, axes, eps):
  """max over rows of |cos(g_i, p_i)|, rows being the slices reduced over ``axes``;
  norms clamped below by eps."""
  g_n = g / jnp.maximum(_norm(g, axes), eps)
  p_n = p / jnp.maximum(_norm(p, axes), eps)
  return jnp.max(jnp.abs(jnp.sum(g_n * p_n, axis=axes)))


def _remove_radial(u, p, axes, eps):
  """u_i - p_hat_i <p_hat_i, u_i> per row, p_hat_i = p_i / (||p_i|| + eps)."""
  p_hat = p / (_norm(p, axes) + eps)
  return u - p_hat * jnp.sum(p_hat * u, axis=axes, keepdims=True)


def adamp_projection(update, grad, param, delta=0.1, wd_ratio=0.1, eps=1e-8):
  """AdamP's projection of one tensor: returns (update, weight-decay multiplier).

  For ``ndim > 1``: if the gradient is nearly orthogonal to the parameter (channel
  view first, then layer view), the update's radial component is removed and the
  multiplier is ``wd_ratio``; otherwise the update is unchanged and the multiplier 1.
  Tensors with ``ndim <= 1`` are never projected.
  """
  if jnp.ndim(param) <= 1:
    return update, jnp.ones([], update.dtype)
  ndim, size = jnp.ndim(param), jnp.size(param)
  outcomes = []
  for axes, row_size in ((tuple(range(1, ndim)), size // jnp.shape(param)[0]),
                         (tuple(range(ndim)), size)):
    threshold = delta / jnp.sqrt(jnp.asarray(row_size, param.dtype))
    passed = _abs_cosine_max(grad, param, axes, eps) < threshold
    outcomes.append((passed, _remove_radial(update, param, axes, eps)))
  (channel_ok, channel_u), (layer_ok, layer_u) = outcomes
  projected = jnp.where(channel_ok, channel_u, jnp.where(layer_ok, layer_u, update))
  ratio = jnp.where(channel_ok | layer_ok, wd_ratio, 1.0).astype(update.dtype)
  return projected, ratio


def _project_and_decay(direction, grads, params, delta, wd_ratio, eps, decay_scale, mask):
  """Per leaf: projected direction + decay_scale * ratio * theta (0 * ... off the mask)."""

  def leaf(u, g, p, scale):
    u, ratio = adamp_projection(u, g, p, delta, wd_ratio, eps)
    return (u + scale * ratio * p).astype(u.dtype)

  return jax.tree.map(leaf, direction, grads, params,
                      _factory.masked_weight_decay(decay_scale, mask, params))


def scale_by_adamp(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, delta=0.1, wd_ratio=0.1,
                   *, nesterov: bool = False, mask: _factory.Mask = None
                   ) -> optax.GradientTransformation:
  r"""Rescales updates by AdamP: Adam, projected on scale-invariant weights, plus decay.

  .. math::
    p_t = \frac{m_t}{\sqrt{\hat v_t} + \epsilon} \;\Big(\text{nesterov: }
    \frac{b_1 m_t + (1 - b_1) g_t}{\sqrt{\hat v_t} + \epsilon}\Big), \quad
    u_t = \frac{\Pi(p_t)}{1 - b_1^t} + \lambda\, r_t\, \theta_{t-1},

  where :math:`\Pi` removes the radial component when the cosine test passes (then
  :math:`r_t` = ``wd_ratio``, else :math:`\Pi = \mathrm{id}, r_t = 1`), see
  :func:`adamp_projection`, and :math:`\lambda` = ``weight_decay``.

  Args:
    b1: first-moment decay.
    b2: second-moment decay.
    eps: :math:`\epsilon` in the denominator, the projection and the cosines.
    weight_decay: decoupled weight decay :math:`\lambda` (0: direction only).
    delta: cosine threshold :math:`\delta` (scaled by ``1 / sqrt(row size)``).
    wd_ratio: decay multiplier on projected tensors.
    nesterov: use the Nesterov momentum of the official code.
    mask: the leaves to decay, as ``optax.masked`` reads it (None: every leaf).

  Returns:
    An ``optax.GradientTransformation`` with state :class:`ScaleByAdampState`; needs
    ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> tx = scale_by_adamp()
    >>> state = tx.init({"w": jnp.zeros((2, 3))})

  References:
    Heo et al, "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
    Scale-invariant Weights", arXiv:2006.08217, 2020
  """
  _validation.check_betas(b1=b1, b2=b2)
  _validation.check_positive(eps=eps)
  _validation.check_nonnegative(weight_decay=weight_decay, delta=delta, wd_ratio=wd_ratio)

  def init_fn(params):
    return ScaleByAdampState(count=jnp.zeros([], jnp.int32), mu=optax.tree.zeros_like(params),
                             nu=optax.tree.zeros_like(params))

  def update_fn(updates, state, params=None):
    params = _validation.require_params(params, "adamp")
    mu = features.update_ema(updates=updates, moments=state.mu, decay=b1)
    nu = features.update_second_moment(state.nu, updates, b2)
    count = optax.safe_increment(state.count)
    if nesterov:
      numerator = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, mu, updates)
    else:
      numerator = mu
    numerator = features.bias_correction(numerator, b1, count)
    direction = features.adam_direction(numerator, features.bias_correction(nu, b2, count),
                                        eps)
    out = _project_and_decay(direction, updates, params, delta, wd_ratio, eps, weight_decay,
                             mask)
    new_state = ScaleByAdampState(count=count, mu=optax.tree.cast_like(mu, state.mu),
                                  nu=optax.tree.cast_like(nu, state.nu))
    return out, new_state

  return optax.GradientTransformation(init_fn, update_fn)


def adamp(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, delta=0.1,
          wd_ratio=0.1, nesterov=False, *, mask: _factory.Mask = None
          ) -> optax.GradientTransformation:
  r"""AdamP: AdamW that stops growing the norm of scale-invariant weights.

  .. math::
    \theta_t = \theta_{t-1} - \eta \left(\frac{\Pi(p_t)}{1 - b_1^t}
    + \lambda\, r_t\, \theta_{t-1}\right),

  with :math:`p_t, \Pi, r_t` as in :func:`scale_by_adamp`, :math:`\eta` =
  ``learning_rate`` and :math:`\lambda` = ``weight_decay``.

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule.
    b1: first-moment decay.
    b2: second-moment decay.
    eps: :math:`\epsilon` (denominator, projection, cosines).
    weight_decay: decoupled weight decay :math:`\lambda`.
    delta: cosine threshold.
    wd_ratio: decay multiplier on projected tensors.
    nesterov: Nesterov momentum as in the official code (a structural switch).
    mask: the leaves to decay, as ``optax.masked`` reads it (None: every leaf).

  Returns:
    An ``optax.GradientTransformation``; ``update`` needs ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> opt = adamp(learning_rate=1e-3, weight_decay=1e-2)
    >>> params = {"w": jnp.ones((2, 3))}
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": jnp.ones((2, 3))}, state, params)

  References:
    Heo et al, "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
    Scale-invariant Weights", arXiv:2006.08217, 2020
  """
  _validation.check_nonnegative(learning_rate=learning_rate)
  return optax.chain(
      scale_by_adamp(b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, delta=delta,
                     wd_ratio=wd_ratio, nesterov=bool(nesterov), mask=mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def scale_by_sgdp(momentum=0.9, dampening=0.0, weight_decay=0.0, delta=0.1, wd_ratio=0.1,
                  eps=1e-8, *, nesterov: bool = False, mask: _factory.Mask = None
                  ) -> optax.GradientTransformation:
  r"""Rescales updates by SGDP: heavy-ball momentum, projected, plus decay.

  .. math::
    b_t = \mu b_{t-1} + (1 - \tau) g_t, \quad
    p_t = b_t \;(\text{nesterov: } g_t + \mu b_t), \quad
    u_t = \Pi(p_t) + \frac{\lambda\, r_t}{1 - \mu} \theta_{t-1},

  with :math:`\mu` = ``momentum``, :math:`\tau` = ``dampening``, :math:`\Pi, r_t` from
  :func:`adamp_projection` and :math:`\lambda` = ``weight_decay`` (divided by
  :math:`1 - \mu` as in the official code).

  Args:
    momentum: momentum :math:`\mu` (the official default is 0).
    dampening: :math:`\tau`.
    weight_decay: decoupled weight decay :math:`\lambda` (0: direction only).
    delta: cosine threshold.
    wd_ratio: decay multiplier on projected tensors.
    eps: :math:`\epsilon` in the projection and the cosines.
    nesterov: Nesterov momentum as in the official code.
    mask: the leaves to decay, as ``optax.masked`` reads it (None: every leaf).

  Returns:
    An ``optax.GradientTransformation`` with state :class:`ScaleBySgdpState`; needs ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> tx = scale_by_sgdp()
    >>> state = tx.init({"w": jnp.zeros((2, 3))})

  References:
    Heo et al, "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
    Scale-invariant Weights", arXiv:2006.08217, 2020
  """
  _validation.check_betas(momentum=momentum)
  _validation.check_range(0.0, 1.0, high_inclusive=True, dampening=dampening)
  _validation.check_nonnegative(weight_decay=weight_decay, delta=delta, wd_ratio=wd_ratio)
  _validation.check_positive(eps=eps)

  def init_fn(params):
    return ScaleBySgdpState(momentum=optax.tree.zeros_like(params))

  def update_fn(updates, state, params=None):
    params = _validation.require_params(params, "sgdp")
    buf = jax.tree.map(lambda b, g: momentum * b + (1 - dampening) * g, state.momentum,
                       updates)
    if nesterov:
      direction = jax.tree.map(lambda g, b: g + momentum * b, updates, buf)
    else:
      direction = buf
    out = _project_and_decay(direction, updates, params, delta, wd_ratio, eps,
                             weight_decay / (1 - momentum), mask)
    return out, ScaleBySgdpState(momentum=optax.tree.cast_like(buf, state.momentum))

  return optax.GradientTransformation(init_fn, update_fn)


def sgdp(learning_rate, momentum=0.9, dampening=0.0, weight_decay=0.0, delta=0.1,
         wd_ratio=0.1, nesterov=False, eps=1e-8, *, mask: _factory.Mask = None
         ) -> optax.GradientTransformation:
  r"""SGDP: SGD with momentum that stops growing the norm of scale-invariant weights.

  .. math::
    \theta_t = \theta_{t-1} - \eta \left(\Pi(p_t) + \frac{\lambda\, r_t}{1 - \mu}
    \theta_{t-1}\right),

  with :math:`p_t, \Pi, r_t` as in :func:`scale_by_sgdp`, :math:`\eta` =
  ``learning_rate``, :math:`\mu` = ``momentum`` and :math:`\lambda` = ``weight_decay``.

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule.
    momentum: momentum :math:`\mu` (the official default is 0).
    dampening: dampening of the gradient in the buffer.
    weight_decay: decoupled weight decay :math:`\lambda`.
    delta: cosine threshold.
    wd_ratio: decay multiplier on projected tensors.
    nesterov: Nesterov momentum as in the official code (a structural switch).
    eps: :math:`\epsilon` in the projection and the cosines.
    mask: the leaves to decay, as ``optax.masked`` reads it (None: every leaf).

  Returns:
    An ``optax.GradientTransformation``; ``update`` needs ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> opt = sgdp(learning_rate=0.1, weight_decay=1e-4)
    >>> params = {"w": jnp.ones((2, 3))}
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": jnp.ones((2, 3))}, state, params)

  References:
    Heo et al, "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
    Scale-invariant Weights", arXiv:2006.08217, 2020
  """
  _validation.check_nonnegative(learning_rate=learning_rate)
  return optax.chain(
      scale_by_sgdp(momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                    delta=delta, wd_ratio=wd_ratio, eps=eps, nesterov=bool(nesterov),
                    mask=mask),
      optax.scale_by_learning_rate(learning_rate),
  )
