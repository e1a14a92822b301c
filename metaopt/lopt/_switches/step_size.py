"""The ``step_size_features`` switch: per-tensor scalars that carry step-size information.

D-Adaptation's and Prodigy's distance from the initialization and its alignment with
the momentum, and the loss trend (:func:`step_size_features`), appended to the MLP's
features after those of the switches registered before it. They enter the MLP through
its per-tensor hidden bias (:func:`metaopt.lopt._network.hidden_bias`): no
per-parameter input. The state keeps the parameters at ``init`` (x_0, one more
parameter-shaped buffer, ``LOState.initial_params``) and a slow loss EMA
(``LOState.loss_ema_slow``); their sums are the statistics pass's: no extra pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metaopt import features as F
from metaopt.lopt._switches._base import ConfigField, Switch, SwitchStep
from metaopt.optimizers import _validation

STEP_SIZE_FEATURES = ("log_distance", "displacement_cosine", "loss_trend")
# The statistics pass's step-size sums: ||x - x_0||^2, ||x_0||^2, <m_fast, x_0 - x>.
STEP_SIZE_SUMS = 3

DOC = """\
    step_size_features: the step-size switch (off by default; artifacts without it
      read as off; :mod:`metaopt.lopt._switches.step_size`). On: the state keeps the
      parameters at ``init`` (x_0, one more parameter-shaped buffer) and a slow loss
      EMA, and the per-tensor features ``STEP_SIZE_FEATURES`` join the MLP (see
      :func:`metaopt.lopt._switches.step_size.step_size_features`).
    loss_trend_decay: decay of the slow loss EMA the ``loss_trend`` feature compares
      with MoMo's fast one (decay ``momentum_decays[0]``).
"""


def _init_state(config, init, info, state):
  """x_0 (a copy of the parameters, in the state's layout) and a zero slow loss EMA."""
  del config, info
  return state._replace(initial_params=init.copy_buffer(),
                        loss_ema_slow=jnp.zeros([], init.scalar_dtype))


def _advance(config, step, state, info, moments, cross) -> SwitchStep:
  """The slow loss EMA and the loss trend: the bias-corrected fast loss EMA (MoMo's)
  against the slow one (:func:`metaopt.features.loss_trend`; 0 without a loss)."""
  del info, moments
  slow, trend = state.loss_ema_slow, jnp.zeros([], step.scalar_dtype)
  if step.with_loss:
    slow = F.update_ema(updates=jnp.asarray(step.value, step.scalar_dtype),
                        moments=state.loss_ema_slow, decay=config.loss_trend_decay)
    bc_fast = step.bias_correction(config.momentum_decays[0])
    trend = F.loss_trend(cross.loss_ema / bc_fast,
                         slow / step.bias_correction(config.loss_trend_decay))
  new_slow = step.keep(slow, state.loss_ema_slow)
  return SwitchStep(block_inputs=step.buffers(state.initial_params), scalars=trend,
                    update_state=lambda new: new._replace(loss_ema_slow=new_slow))


def _statistic_terms(config, inp) -> list:
  """The terms of ||x - x_0||^2, ||x_0||^2 and <m_fast, x_0 - x>."""
  del config
  x0 = inp.extra["step_size_features"]
  disp = inp.x - x0
  return [jnp.square(disp), jnp.square(x0), -inp.m_fast * disp]


def step_size_features(disp_sq, x0_sq, x_sq, m_dot_disp, m_sq, trend) -> jax.Array:
  """The :data:`STEP_SIZE_FEATURES` of every tensor, ``[n, 3]``, from per-tensor sums
  (``[n]`` each: ||x - x_0||^2, ||x_0||^2, ||x||^2, <m_fast, x_0 - x>, ||m_fast||^2)
  and the global loss trend (a scalar).

  The signals D-Adaptation (Defazio & Mishchenko, "Learning-Rate-Free Learning by
  D-Adaptation", arXiv:2301.07733, 2023) and Prodigy (Mishchenko & Defazio, "Prodigy:
  An Expeditiously Adaptive Parameter-Free Learner", arXiv:2306.06101, 2023) set their
  step from: their distance estimate is ``sum_k lambda_k <g_k, x_0 - x_k> /
  ||sum_k lambda_k g_k||`` (Prodigy Alg. 1). With x_0 the parameters at ``init``,
  x = x_{t-1} the parameters the step is given and m the fast momentum after this
  step's gradient, per tensor::

    log_distance        = log10(r + 1e-8) / 4,
                          r = RMS(x - x_0) / max(RMS(x_0), RMS(x))  (0 if both are 0),
    displacement_cosine = <m, x_0 - x> / (||m|| ||x_0 - x||)        (0 if either is 0),
    loss_trend          = (fbar - fslow) / (|fbar| + |fslow|)       (global; 0 without
                          ``value``), fbar = MoMo's b_fast-EMA of the loss / (1 - b_fast^t),
                          fslow = its ``loss_trend_decay``-EMA / (1 - decay^t).

  Each is scale-free per tensor (unchanged when a tensor and its initialization are
  multiplied by s > 0; the loss trend when the loss is), finite at step 1 (x = x_0:
  -2, 0, 0) and bounded: [-2, 0.08], [-1, 1], [-1, 1]. The max in r keeps it finite
  for zero-initialized tensors (biases), whose r is 1 once they move. The cosine is
  Prodigy's numerator normalized: positive while the momentum keeps pointing along the
  path travelled, negative once it points back to x_0 (overshoot). A rising loss is
  the classic sign of a step too large.
  """
  log_distance = F.log_distance(F.distance_ratio_from_sums(disp_sq, x0_sq, x_sq))
  cosine = F.cosine_from_sums(m_dot_disp, m_sq, disp_sq, eps=1e-30)
  feats = jnp.stack([log_distance, cosine, jnp.broadcast_to(trend, cosine.shape)], axis=1)
  assert feats.shape[1] == len(STEP_SIZE_FEATURES)
  return feats


def _tensor_feature_values(config, sums, sum_sq, switch_step):
  """:func:`step_size_features` from this switch's sums and the statistics pass's
  sums of squares of the parameters and the fast momentum."""
  del config
  disp_sq, x0_sq, m_dot_disp = sums.T
  return step_size_features(disp_sq, x0_sq, sum_sq["param"], m_dot_disp,
                            sum_sq["momentum_fast"], switch_step.scalars)


SWITCH = Switch(
    name="step_size_features", doc=DOC,
    fields=(ConfigField("loss_trend_decay", "float", 0.99),),
    state_fields=("initial_params", "loss_ema_slow"),
    tensor_features=STEP_SIZE_FEATURES, statistic_sums=STEP_SIZE_SUMS,
    validate=lambda config: _validation.check_betas(loss_trend_decay=config.loss_trend_decay),
    init_state=_init_state, advance=_advance, statistic_terms=_statistic_terms,
    tensor_feature_values=_tensor_feature_values,
)
