"""The learned optimizer's rule for one tensor: candidates -> features -> MLP -> update.

Everything here reads one tensor's buffers (or a flat buffer of many: the math is
elementwise) and named tuples of scalars; where the buffers live and how the per-tensor
sums are taken is the engine's (:mod:`metaopt.lopt._engine`). A function that needs a
per-tensor statistic returns the terms to sum; the engine sums them in the same pass.

update = -lr * s_mup * exp(log_lr) * (sum_k mix_k c_k + lambda1 d) * exp(lambda2 m):
the candidates c_k (:func:`candidate_directions`), the MLP's direction d and
log-magnitude m (:func:`tensor_update`), s_mup = base_fan_in / fan_in for hidden
tensors (1 otherwise, or when muP is off).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from metaopt import features as F
from metaopt.lopt import _network
from metaopt.lopt._config import (BOUNDED_FEATURES, CANDIDATE_NAMES, NORMALIZED_FEATURES,
                                  STEP_SIZE_FEATURES, SWITCHES, TENSOR_FEATURES, TIME_TAUS,
                                  LOConfig)
from metaopt.lopt._engine import factored_rsqrt, on_whole_matrix


class StepContext(NamedTuple):
  """Scalars shared by every tensor in one step (the cross-tensor part of the rules)."""

  bc_fast: jax.Array  # 1 - b_fast^t
  bc_v: jax.Array  # 1 - b2^t
  bc_laprop: jax.Array  # 1 - b_laprop^t
  momo_tau: jax.Array  # MoMo-Adam's step (its cap alpha / bc_fast without a loss).
  learning_rate: jax.Array  # the user's multiplier, with the horizon decay applied.
  count: jax.Array  # t, the 1-based step (Nesterov Adam's bias corrections).


class LeafInputs(NamedTuple):
  """One tensor's quantities after this step's state update: what features read."""

  g: jax.Array
  x: jax.Array
  m_fast: jax.Array
  m_mid_prev: jax.Array  # before this step: Lion interpolates it with g.
  m_slow: jax.Array
  v: jax.Array
  tam_m: jax.Array
  laprop_m: jax.Array
  rsqrt_fact: Any  # 1 / sqrt(Adafactor's V_hat); on a tensor's own block its
  # accumulators (F.FactoredMoment), from which each pass rebuilds it (with_rsqrt_fact).
  mup_scale: jax.Array
  muon: Any = None  # Muon's direction on a hidden matrix (LOConfig.muon), else None.
  x0: Any = None  # the initial parameters (LOConfig.step_size_features), else None.


# The parameter-shaped fields of LeafInputs (what a pass may read on its own copy).
BUFFER_FIELDS = ("g", "x", "m_fast", "m_mid_prev", "m_slow", "v", "tam_m", "laprop_m",
                 "rsqrt_fact", "muon", "x0")


def with_rsqrt_fact(inp: LeafInputs) -> LeafInputs:
  """``inp`` with Adafactor's 1 / sqrt(V_hat) built where it holds the accumulators."""
  if isinstance(inp.rsqrt_fact, F.FactoredMoment):
    return inp._replace(rsqrt_fact=factored_rsqrt(inp.rsqrt_fact, inp.g))
  return inp


class Moments(NamedTuple):
  """One block's moments that need no cross-tensor scalar (the first pass)."""

  m_fast: jax.Array
  m_mid: jax.Array
  m_slow: jax.Array
  v: jax.Array


class TensorScalars(NamedTuple):
  """Per-tensor statistics the elementwise pass reads."""

  cautious_norm: jax.Array  # 1 / max(mean(cautious mask), 1e-3)
  inv_rms: jax.Array  # [len(NORMALIZED_FEATURES) (+ 1: the muon feature)] 1 / RMS.
  bias: jax.Array  # [hidden] the MLP's first-layer bias with per-tensor features.


class Candidates(NamedTuple):
  """The classical directions of one tensor, in ``LOConfig.candidate_names`` order
  (None: a candidate absent from this tensor, or with the muon switch off)."""

  sgdm: jax.Array
  adam: jax.Array
  lion: jax.Array
  cautious_adam: jax.Array
  tam: jax.Array
  adatam: jax.Array
  ademamix: jax.Array
  momo_adam: jax.Array
  grams: jax.Array
  laprop: jax.Array
  weight_decay: jax.Array
  muon: Any = None
  nadam: Any = None


assert Candidates._fields == CANDIDATE_NAMES + sum((s.candidates for s in SWITCHES), ())


def candidate_directions(config: LOConfig, ctx: StepContext, inp: LeafInputs,
                         cautious_norm) -> tuple[Candidates, Any]:
  """The classical directions (before the learning rate; optax sign: to be subtracted).

  SGD-M, Adam, Lion, cautious Adam, TAM, AdaTAM, AdEMAMix, MoMo-Adam, Grams, LaProp and
  decoupled weight decay from the raw state (their papers are cited where
  :mod:`metaopt.features` computes each); with ``config.muon`` also Muon's direction
  (:func:`muon_candidate`; zero off hidden matrices) and Nesterov Adam
  ``m_hat_nesterov / (sqrt(v_hat) + eps)``.

  ``cautious_norm`` is the per-tensor renormalization 1 / max(mean(mask), 1e-3) of the
  cautious mask (:func:`metaopt.features.cautious_mask`). Returns the candidates and
  ``inverse_denominator(eps)`` = 1 / (sqrt(v_hat) + eps).

  Divisions are multiplications by reciprocals computed once per tensor (or once per
  scalar): XLA does not duplicate a division into the several fusions that read it, so
  each quotient would otherwise be written to memory and read back.
  """
  g = inp.g
  m_hat = inp.m_fast * (1 / ctx.bc_fast)
  v_hat = inp.v * (1 / ctx.bc_v)
  cache = {}

  def inverse_denominator(eps):
    if eps not in cache:
      cache[eps] = F.inverse_adam_denominator(v_hat, eps)
    return cache[eps]

  adam = m_hat * inverse_denominator(config.adam_eps)
  cands = Candidates(
      sgdm=inp.m_fast * (1 / (1 - config.momentum_decays[0])),
      adam=adam,
      lion=F.lion_direction(inp.m_mid_prev, g, config.lion_b1),
      cautious_adam=adam * (F.agreement(adam, g) * cautious_norm),
      tam=inp.tam_m,
      adatam=inp.tam_m * inverse_denominator(config.adatam_eps),
      ademamix=(m_hat + config.ademamix_alpha * inp.m_slow) *
      inverse_denominator(config.adam_eps),
      momo_adam=ctx.momo_tau * inp.m_fast * inverse_denominator(config.adam_eps),
      grams=F.grams_direction(g, m_hat * inverse_denominator(config.grams_eps)),
      laprop=inp.laprop_m * (1 / ctx.bc_laprop),
      weight_decay=inp.x,
  )
  if config.muon:
    b_fast = config.momentum_decays[0]
    cands = cands._replace(
        muon=inp.muon,
        nadam=F.nesterov_momentum(inp.m_fast, g, b_fast, ctx.count) *
        inverse_denominator(config.adam_eps))
  return cands, inverse_denominator


def elementwise_features(config, ctx, inp: LeafInputs):
  """(candidates, raw normalized-feature values, bounded features) of one tensor.

  The cautious candidate and feature are returned *before* their per-tensor
  renormalization (``cautious_norm = 1``): the norm is a statistic of this same pass.
  """
  cands, inverse_denominator = candidate_directions(config, ctx, inp, 1.0)
  g, rsqrt_fact = inp.g, inp.rsqrt_fact
  by_name = dict(grad=g, param=inp.x, momentum_fast=inp.m_fast,
                 momentum_mid=inp.m_mid_prev, momentum_slow=inp.m_slow,
                 rsqrt_second_moment=inverse_denominator(1e-8), adam=cands.adam,
                 adafactor_grad=g * rsqrt_fact, adafactor_momentum=inp.m_fast * rsqrt_fact,
                 tam_momentum=inp.tam_m, laprop=inp.laprop_m, lion_sign=cands.lion,
                 cautious_adam=cands.cautious_adam, grams=cands.grams,
                 ademamix=cands.ademamix)
  agreement = F.agreement(cands.adam, g)
  return cands, [by_name[n] for n in NORMALIZED_FEATURES], [agreement]


assert BOUNDED_FEATURES == ("cautious_agreement",)
_CAUTIOUS = NORMALIZED_FEATURES.index("cautious_adam")


def _log_rms(sum_sq, size):
  return jnp.log10(jnp.sqrt(sum_sq / size) + 1e-8) / 4.0


# The per-tensor sums of the first pass: TAM's torque cosine, then MoMo's inner products.
TORQUE_SUMS = 3


def advance_moments(config: LOConfig, bc_v, with_loss: bool, prev: Moments, tam_m, g, x
                    ) -> tuple[Moments, list]:
  """This step's moments (:mod:`metaopt.features`) and the raw terms to sum per tensor.

  Terms: <m_tam, g>, ||m_tam||^2, ||g||^2 (TAM's torque cosine, before this step's TAM
  momentum) and, with a loss, <g, x>, <m, m / (sqrt(v_hat) + eps)>, <m, x> (MoMo-Adam,
  Schaipp et al, "MoMo: Momentum Models for Adaptive Learning Rates", arXiv:2305.07583,
  2023). Every term is zero on the flat layout's padding.
  """
  b_fast, b_mid, b_slow = config.momentum_decays
  m_fast = F.update_ema(updates=g, moments=prev.m_fast, decay=b_fast)
  v = F.update_second_moment(prev.v, g, config.second_moment_decay)
  moments = Moments(m_fast=m_fast,
                    m_mid=F.update_ema(updates=g, moments=prev.m_mid, decay=b_mid),
                    m_slow=F.update_ema(updates=g, moments=prev.m_slow, decay=b_slow), v=v)
  terms = [tam_m * g, jnp.square(tam_m), jnp.square(g)]
  if with_loss:
    direction = m_fast * F.inverse_adam_denominator(v * (1 / bc_v), config.adam_eps)
    terms += [g * x, m_fast * direction, m_fast * x]
  return moments, terms


def advance_factored(decay, finite, acc: F.FactoredMoment, g):
  """Adafactor's accumulators of one tensor and its 1 / sqrt(V_hat).

  A skipped step (``finite`` False) runs the EMA with decay 1 on a zero gradient,
  which leaves the accumulators bitwise unchanged (1 * a + 0 * eps = a): the selection
  happens inside the reduction's fusion rather than as a select per accumulator
  afterwards (two more compiled programs per tensor).
  """
  if finite is not None:
    decay = jnp.where(finite, decay, jnp.ones([], jnp.result_type(decay)))
    g = jnp.where(finite, g, jnp.zeros([], g.dtype))
  acc = F.update_factored(acc, g, decay)
  return acc, factored_rsqrt(acc, g)


def advance_tam_laprop(config: LOConfig, bc_v, damping, tam_m, laprop_m, g, v):
  """TAM's and LaProp's momenta of one block."""
  tam_m = F.update_tam_momentum(tam_m, g, config.tam_beta, damping, config.tam_eps)
  laprop_in = F.adam_direction(g, v * (1 / bc_v), config.laprop_eps)
  laprop_m = F.update_ema(updates=laprop_in, moments=laprop_m,
                          decay=config.laprop_b1)
  return tam_m, laprop_m


def muon_candidate(config: LOConfig, count, fan_in: int, with_ema: bool, mu, g):
  """Muon's momentum, direction and the direction's sum of squares for one hidden
  matrix W (Jordan et al, "Muon: An optimizer for hidden layers in neural networks",
  2024), viewed as ``[fan_in, size / fan_in]`` (a conv kernel as one matrix)::

    c_muon = s NS_5(mu_hat),  mu_t = beta mu_{t-1} + (1 - beta) g_t,
    mu_hat = beta mu_t / (1 - beta^(t+1)) + (1 - beta) g_t / (1 - beta^t),
    s = sqrt(max(1, fan_out / fan_in)),

  NS_5 the quintic Newton-Schulz iteration
  (:func:`metaopt.features.newton_schulz_orthogonalize`). ``mu`` is this step's
  momentum EMA of decay beta, or with ``with_ema`` the previous one of Muon's own
  buffer, advanced here."""
  if with_ema:
    mu = F.update_ema(updates=g, moments=mu, decay=config.muon_beta)
  m_hat = F.nesterov_momentum(mu, g, config.muon_beta, count)
  direction = on_whole_matrix(lambda m: F.muon_direction(
      m, fan_in, config.muon_ns_steps, F.NEWTON_SCHULZ_COEFFS, config.muon_eps), m_hat)
  return mu, direction, jnp.sum(jnp.square(direction))


def feature_statistics(config: LOConfig, ctx: StepContext, inp: LeafInputs):
  """(None, the terms of every per-tensor sum the features need): each normalized
  feature's square (the cautious one before its renormalization), the cautious mask,
  then with ``config.step_size_features`` the :data:`STEP_SIZE_SUMS` terms."""
  _, raw, bounded = elementwise_features(config, ctx, inp)
  terms = [jnp.square(f) for f in raw] + bounded
  if config.step_size_features:
    disp = inp.x - inp.x0
    terms += [jnp.square(disp), jnp.square(inp.x0), -inp.m_fast * disp]
  return None, terms


# The statistics pass's step-size sums: ||x - x_0||^2, ||x_0||^2, <m_fast, x_0 - x>.
STEP_SIZE_SUMS = 3


# Per-parameter features: the rows of w1 before the per-tensor ones, and the statistics
# pass's sums before its step-size sums (one per feature: a sum of squares or a count).
NUM_ELEMENTWISE = len(NORMALIZED_FEATURES) + len(BOUNDED_FEATURES)


def step_size_features(disp_sq, x0_sq, x_sq, m_dot_disp, m_sq, trend) -> jax.Array:
  """The :data:`metaopt.lopt._config.STEP_SIZE_FEATURES` of every tensor, ``[n, 3]``,
  from per-tensor sums (``[n]`` each: ||x - x_0||^2, ||x_0||^2, ||x||^2,
  <m_fast, x_0 - x>, ||m_fast||^2) and the global loss trend (a scalar).

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
  the classic sign of a step too large. Their sums are the statistics pass's
  (:func:`feature_statistics`): no extra pass, one more buffer (x_0).
  """
  log_distance = F.log_distance(F.distance_ratio_from_sums(disp_sq, x0_sq, x_sq))
  cosine = F.cosine_from_sums(m_dot_disp, m_sq, disp_sq, eps=1e-30)
  feats = jnp.stack([log_distance, cosine, jnp.broadcast_to(trend, cosine.shape)], axis=1)
  assert feats.shape[1] == len(STEP_SIZE_FEATURES)
  return feats


def tensor_scalars(config: LOConfig, theta: dict, sums, sizes, tensor_features, time,
                    muon_sum_sq=None, trend=None) -> TensorScalars:
  """Per-tensor statistics of every tensor at once (rows: tensors).

  ``tensor_features``: the first per-tensor features (damping, Polyak ratio, has-loss),
  to which the two log-RMS features and the time features are appended, as in
  :data:`metaopt.lopt.FEATURE_NAMES`. ``muon_sum_sq``: the muon feature's sums of
  squares (0 where it is absent), with the switch on. ``trend``: the loss trend, with
  ``config.step_size_features`` (whose features follow, at their rows).
  """
  stats, step_size_sums = sums[:, :NUM_ELEMENTWISE], sums[:, NUM_ELEMENTWISE:]
  cautious_norm = 1 / jnp.maximum(stats[:, -1] / sizes, 1e-3)
  sum_sq = stats[:, :-1].at[:, _CAUTIOUS].multiply(jnp.square(cautious_norm))
  if muon_sum_sq is not None:
    sum_sq = jnp.concatenate([sum_sq, muon_sum_sq[:, None]], axis=1)
  inv_rms = jax.lax.rsqrt(sum_sq / sizes[:, None] + 1e-8)
  idx_x, idx_g = NORMALIZED_FEATURES.index("param"), NORMALIZED_FEATURES.index("grad")
  log_rms = [_log_rms(sum_sq[:, idx_x], sizes), _log_rms(sum_sq[:, idx_g], sizes)]
  scalars = [tensor_features, jnp.stack(log_rms, axis=1),
             jnp.broadcast_to(time, (sizes.shape[0], time.shape[0]))]
  rows = list(range(NUM_ELEMENTWISE,
                    NUM_ELEMENTWISE + len(TENSOR_FEATURES) + len(TIME_TAUS) + 2))
  if config.step_size_features:
    idx_m = NORMALIZED_FEATURES.index("momentum_fast")
    assert step_size_sums.shape[1] == STEP_SIZE_SUMS
    disp_sq, x0_sq, m_dot_disp = step_size_sums.T
    scalars.append(step_size_features(disp_sq, x0_sq, sum_sq[:, idx_x], m_dot_disp,
                                      sum_sq[:, idx_m], trend))
    first = config.feature_names.index(STEP_SIZE_FEATURES[0])
    rows += list(range(first, first + len(STEP_SIZE_FEATURES)))
  scalars = jnp.concatenate(scalars, axis=1)
  return TensorScalars(cautious_norm, inv_rms, _network.hidden_bias(theta, scalars, rows))


def tensor_update(config: LOConfig, theta: dict, ctx: StepContext, inp: LeafInputs,
                   scalars: TensorScalars):
  """The update of one tensor: features, MLP and classical mix in one elementwise pass."""
  dtype = inp.g.dtype
  cands, raw, bounded = elementwise_features(config, ctx, inp)
  cautious_norm = scalars.cautious_norm.astype(dtype)
  cands = cands._replace(cautious_adam=cands.cautious_adam * cautious_norm)
  raw[_CAUTIOUS] = raw[_CAUTIOUS] * cautious_norm
  clip = config.feature_clip
  inv_rms = scalars.inv_rms.astype(dtype)
  feats = [jnp.clip(f * inv_rms[i], -clip, clip) for i, f in enumerate(raw)] + bounded
  rows, mix = None, theta["mix"]
  if inp.muon is not None:  # a hidden matrix: the muon feature and the hidden mix
    feats.append(jnp.clip(inp.muon * inv_rms[len(raw)], -clip, clip))
    rows = list(range(len(feats) - 1)) + [config.feature_names.index("muon")]
    mix = mix + theta["hidden_mix"]
  direction, log_mag = _network.mlp_outputs_elementwise(theta, feats, scalars.bias,
                                                         dtype, rows)
  mix = mix.astype(dtype)
  classical = sum(mix[k] * c for k, c in enumerate(cands) if c is not None)
  step = classical + config.step_mult * direction
  log_mag = jnp.clip(config.log_step_mult * log_mag, -config.max_log_step,
                     config.max_log_step)
  scale = ctx.learning_rate * inp.mup_scale * jnp.exp(theta["log_lr"].astype(dtype))
  return -scale * step * jnp.exp(log_mag)
