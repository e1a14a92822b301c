"""Torque-Aware Momentum (TAM) and its adaptive variant AdaTAM.

Malviya et al, "Torque-Aware Momentum", arXiv:2412.18790, 2024.

No official code was found; the per-tensor scalar cosine follows the paper: for each
pytree leaf, ``s_t`` is the cosine between the whole previous momentum tensor and the
whole gradient tensor (0 when either is zero, e.g. at the first step).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from metaopt import features
from metaopt.optimizers import _factory
from metaopt.optimizers import _validation


class ScaleByTamState(NamedTuple):
  """State of :func:`scale_by_tam`."""

  count: jax.Array  # int32 scalar, number of updates applied.
  momentum: optax.Updates  # m, shaped like the params.
  torque: optax.Updates  # s_hat, one scalar per leaf.


class ScaleByAdatamState(NamedTuple):
  """State of :func:`scale_by_adatam`."""

  count: jax.Array  # int32 scalar, number of updates applied.
  momentum: optax.Updates  # m, shaped like the params.
  torque: optax.Updates  # s_hat, one scalar per leaf.
  nu: optax.Updates  # second-moment EMA v, shaped like the params.


def _torque_init(params):
  """s_hat_0 = 0 per leaf, in (at least) float32 so bf16 params keep a precise cosine."""
  return jax.tree.map(
      lambda p: jnp.zeros([], jnp.promote_types(jnp.result_type(p), jnp.float32)), params)


def _tam_momentum_step(g, momentum, torque, beta, gamma, eps):
  """One TAM momentum step on whole trees: returns (m_t, s_hat_t)."""
  s = jax.tree.map(features.torque_cosine, momentum, g)
  s_hat = jax.tree.map(
      lambda sh, s: features.update_torque_ema(sh, s, gamma).astype(sh.dtype), torque, s)
  m = jax.tree.map(
      lambda m, g, sh: features.update_tam_momentum(
          m, g, beta, features.tam_damping(sh).astype(g.dtype), eps).astype(m.dtype),
      momentum, g, s_hat)
  return m, s_hat


def scale_by_tam(beta=0.9, gamma=0.9, eps=1e-8) -> optax.GradientTransformation:
  r"""Rescales updates by Torque-Aware Momentum (direction only, no learning rate).

  .. math::
    s_t = \frac{\langle m_{t-1}, g_t \rangle}{\|m_{t-1}\| \|g_t\|}, \quad
    \hat s_t = \gamma \hat s_{t-1} + (1 - \gamma) s_t, \quad
    d_t = \tfrac{1 + \hat s_t}{2}, \quad
    m_t = \beta m_{t-1} + (\epsilon + d_t) g_t,

  and the returned direction is :math:`m_t`. Cosines are per tensor (pytree leaf);
  :math:`s_t = 0` when a norm is zero (so :math:`d_1 = 1/2`).

  Args:
    beta: momentum decay :math:`\beta`.
    gamma: decay :math:`\gamma` of the smoothed cosine :math:`\hat s`.
    eps: :math:`\epsilon`, keeps a small step for fully opposed gradients.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`ScaleByTamState`.

  Example:
    >>> import jax.numpy as jnp
    >>> tx = scale_by_tam()
    >>> state = tx.init({"w": jnp.zeros(3)})

  References:
    Malviya et al, "Torque-Aware Momentum", arXiv:2412.18790, 2024
    (no official code was found; the per-tensor scalar cosine follows the paper).
  """
  _validation.check_betas(beta=beta, gamma=gamma)
  _validation.check_positive(eps=eps)

  def init_fn(params):
    return ScaleByTamState(count=jnp.zeros([], jnp.int32),
                           momentum=optax.tree.zeros_like(params), torque=_torque_init(params))

  def update_fn(updates, state, params=None):
    del params
    m, s_hat = _tam_momentum_step(updates, state.momentum, state.torque, beta, gamma, eps)
    new_state = ScaleByTamState(count=optax.safe_increment(state.count), momentum=m, torque=s_hat)
    return m, new_state

  return optax.GradientTransformation(init_fn, update_fn)


def tam(learning_rate, beta=0.9, gamma=0.9, eps=1e-8, weight_decay=0.0, *,
        mask: _factory.Mask = None) -> optax.GradientTransformation:
  r"""Torque-Aware Momentum: SGD with momentum damped by gradient/momentum misalignment.

  .. math::
    m_t = \beta m_{t-1} + (\epsilon + d_t) g_t, \quad
    \theta_t = \theta_{t-1} - \eta (m_t + \lambda \theta_{t-1}),

  with the damping :math:`d_t` of :func:`scale_by_tam`, :math:`\eta` =
  ``learning_rate`` and :math:`\lambda` = ``weight_decay`` (decoupled, AdamW-style;
  the paper states no weight-decay form for TAM).

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule.
    beta: momentum decay :math:`\beta`.
    gamma: decay of the smoothed cosine.
    eps: :math:`\epsilon` added to the damping factor.
    weight_decay: decoupled weight decay :math:`\lambda`.
    mask: the leaves to decay, as ``optax.masked`` reads it (None: every leaf).

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax.numpy as jnp
    >>> opt = tam(learning_rate=0.1)
    >>> params = {"w": jnp.ones(3)}
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": jnp.ones(3)}, state, params)

  References:
    Malviya et al, "Torque-Aware Momentum", arXiv:2412.18790, 2024
  """
  return _factory.decayed_descent(scale_by_tam(beta=beta, gamma=gamma, eps=eps),
                                  learning_rate, weight_decay, mask)


def scale_by_adatam(beta=0.9, gamma=0.9, b2=0.999, eps=1e-8
                    ) -> optax.GradientTransformation:
  r"""Rescales updates by AdaTAM: TAM momentum over Adam's second moment (direction only).

  .. math::
    m_t = \beta m_{t-1} + (\epsilon + d_t) g_t, \quad
    v_t = b_2 v_{t-1} + (1 - b_2) g_t^2, \quad
    u_t = \frac{m_t}{\sqrt{v_t / (1 - b_2^t)} + \epsilon}.

  The paper writes :math:`m_t / (\sqrt{v_t} + \epsilon)`; we bias-correct :math:`v`
  as Adam does (AdaTAM is presented as Adam with TAM momentum). Without it the first
  step would be :math:`1/\sqrt{1 - b_2} \approx 31.6` times larger. :math:`m_t` is
  TAM's momentum (a damped sum, not an EMA) and is not bias-corrected. The same
  :math:`\epsilon` serves the damping and the denominator, as in the paper.

  Args:
    beta: momentum decay :math:`\beta`.
    gamma: decay of the smoothed cosine.
    b2: second-moment decay :math:`b_2`.
    eps: :math:`\epsilon`.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`ScaleByAdatamState`.

  Example:
    >>> import jax.numpy as jnp
    >>> tx = scale_by_adatam()
    >>> state = tx.init({"w": jnp.zeros(3)})

  References:
    Malviya et al, "Torque-Aware Momentum", arXiv:2412.18790, 2024
    (no official code was found; the per-tensor scalar cosine follows the paper).
  """
  _validation.check_betas(beta=beta, gamma=gamma, b2=b2)
  _validation.check_positive(eps=eps)

  def init_fn(params):
    return ScaleByAdatamState(count=jnp.zeros([], jnp.int32),
                              momentum=optax.tree.zeros_like(params),
                              torque=_torque_init(params), nu=optax.tree.zeros_like(params))

  def update_fn(updates, state, params=None):
    del params
    m, s_hat = _tam_momentum_step(updates, state.momentum, state.torque, beta, gamma, eps)
    nu = features.update_second_moment(state.nu, updates, b2)
    count = optax.safe_increment(state.count)
    nu_hat = features.bias_correction(nu, b2, count)
    direction = features.adam_direction(m, nu_hat, eps)
    nu = optax.tree.cast_like(nu, state.nu)
    return direction, ScaleByAdatamState(count=count, momentum=m, torque=s_hat, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def adatam(learning_rate, beta=0.9, gamma=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, *,
           mask: _factory.Mask = None) -> optax.GradientTransformation:
  r"""AdaTAM: Adam-style normalization of Torque-Aware Momentum, decoupled decay.

  .. math::
    \theta_t = \theta_{t-1} - \eta \left(\frac{m_t}{\sqrt{\hat v_t} + \epsilon}
    + \lambda \theta_{t-1}\right),

  with :math:`m_t, \hat v_t` from :func:`scale_by_adatam` (:math:`\hat v_t` is
  bias-corrected), :math:`\eta` = ``learning_rate`` and :math:`\lambda` =
  ``weight_decay`` (AdamW-style, the paper's AdaTAMW).

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule.
    beta: momentum decay :math:`\beta`.
    gamma: decay of the smoothed cosine.
    b2: second-moment decay.
    eps: :math:`\epsilon` (damping floor and denominator).
    weight_decay: decoupled weight decay :math:`\lambda`.
    mask: the leaves to decay, as ``optax.masked`` reads it (None: every leaf).

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax.numpy as jnp
    >>> opt = adatam(learning_rate=1e-3)
    >>> params = {"w": jnp.ones(3)}
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": jnp.ones(3)}, state, params)

  References:
    Malviya et al, "Torque-Aware Momentum", arXiv:2412.18790, 2024
  """
  return _factory.decayed_descent(scale_by_adatam(beta=beta, gamma=gamma, b2=b2, eps=eps),
                                  learning_rate, weight_decay, mask)
