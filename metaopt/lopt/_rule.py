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
                                  TENSOR_FEATURES, TIME_TAUS, LOConfig)
from metaopt.lopt._engine import factored_rsqrt


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
  # Per switch turned on, its inputs ({switch name: arrays or None}; see
  # metaopt.lopt._switches): x_0 with step_size_features, Muon's direction on a matrix
  # it orthogonalizes with muon.
  extra: Any = None


# The parameter-shaped fields of LeafInputs (what a pass may read on its own copy).
BUFFER_FIELDS = ("g", "x", "m_fast", "m_mid_prev", "m_slow", "v", "tam_m", "laprop_m",
                 "rsqrt_fact", "extra")


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
  inv_rms: jax.Array  # [len(normalized_names(config))] 1 / RMS.
  bias: jax.Array  # [hidden] the MLP's first-layer bias with per-tensor features.


class Candidates(NamedTuple):
  """The classical directions of one tensor, in :data:`CANDIDATE_NAMES` order (the
  switches' follow: :func:`switch_candidates`)."""

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


assert Candidates._fields == CANDIDATE_NAMES


def candidate_directions(config: LOConfig, ctx: StepContext, inp: LeafInputs,
                         cautious_norm) -> tuple[Candidates, Any]:
  """The classical directions (before the learning rate; optax sign: to be subtracted).

  SGD-M, Adam, Lion, cautious Adam, TAM, AdaTAM, AdEMAMix, MoMo-Adam, Grams, LaProp and
  decoupled weight decay from the raw state (their papers are cited where
  :mod:`metaopt.features` computes each); the switches' candidates are
  :func:`switch_candidates`'.

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
  return cands, inverse_denominator


def switch_candidates(config: LOConfig, ctx: StepContext, inp: LeafInputs,
                      inverse_denominator) -> list:
  """The candidates of the switches turned on, in ``LOConfig.candidate_names`` order
  after :class:`Candidates` (None: absent from this tensor)."""
  return [c for s in config.switches_on
          for c in s.leaf_candidates(config, ctx, inp, inverse_denominator)]


def normalized_names(config: LOConfig) -> tuple[str, ...]:
  """The RMS-normalized per-parameter features: :data:`NORMALIZED_FEATURES`, then the
  switches' (``TensorScalars.inv_rms``'s columns)."""
  return NORMALIZED_FEATURES + sum((s.elementwise_features for s in config.switches_on), ())


def elementwise_features(config, ctx, inp: LeafInputs):
  """(candidates, raw normalized-feature values, bounded features,
  ``inverse_denominator``) of one tensor (the switches' not included).

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
  return cands, [by_name[n] for n in NORMALIZED_FEATURES], [agreement], inverse_denominator


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


def feature_statistics(config: LOConfig, ctx: StepContext, inp: LeafInputs):
  """(None, the terms of every per-tensor sum the features need): each normalized
  feature's square (the cautious one before its renormalization), the cautious mask,
  then each switch's ``statistic_sums`` terms (in ``config.switches_on`` order)."""
  _, raw, bounded, _ = elementwise_features(config, ctx, inp)
  terms = [jnp.square(f) for f in raw] + bounded
  for switch in config.switches_on:
    terms += switch.statistic_terms(config, inp)
  return None, terms


# Per-parameter features: the rows of w1 before the per-tensor ones, and the statistics
# pass's sums before the switches' (one per feature: a sum of squares or a count).
NUM_ELEMENTWISE = len(NORMALIZED_FEATURES) + len(BOUNDED_FEATURES)


def tensor_scalars(config: LOConfig, theta: dict, sums, sizes, tensor_features, time,
                   switch_steps: dict | None = None) -> TensorScalars:
  """Per-tensor statistics of every tensor at once (rows: tensors).

  ``tensor_features``: the first per-tensor features (damping, Polyak ratio, has-loss),
  to which the two log-RMS features and the time features are appended, as in
  :data:`metaopt.lopt.FEATURE_NAMES`. ``switch_steps``: per switch turned on, what it
  computed this step (:class:`metaopt.lopt._switches.SwitchStep`: the sums of squares
  of its per-parameter features, what its per-tensor features need); the sums past
  :data:`NUM_ELEMENTWISE` are the switches' ``statistic_sums``, in order.
  """
  switch_steps = switch_steps or {}
  stats = sums[:, :NUM_ELEMENTWISE]
  cautious_norm = 1 / jnp.maximum(stats[:, -1] / sizes, 1e-3)
  sum_sq = stats[:, :-1].at[:, _CAUTIOUS].multiply(jnp.square(cautious_norm))
  switch_sq = [switch_steps[s.name].sum_sq for s in config.switches_on
               if s.elementwise_features]
  if switch_sq:
    sum_sq = jnp.concatenate([sum_sq] + switch_sq, axis=1)
  inv_rms = jax.lax.rsqrt(sum_sq / sizes[:, None] + 1e-8)
  idx_x, idx_g = NORMALIZED_FEATURES.index("param"), NORMALIZED_FEATURES.index("grad")
  log_rms = [_log_rms(sum_sq[:, idx_x], sizes), _log_rms(sum_sq[:, idx_g], sizes)]
  scalars = [tensor_features, jnp.stack(log_rms, axis=1),
             jnp.broadcast_to(time, (sizes.shape[0], time.shape[0]))]
  rows = list(range(NUM_ELEMENTWISE,
                    NUM_ELEMENTWISE + len(TENSOR_FEATURES) + len(TIME_TAUS) + 2))
  switch_scalars, switch_rows = _switch_tensor_features(config, sums, sum_sq, switch_steps)
  scalars = jnp.concatenate(scalars + switch_scalars, axis=1)
  return TensorScalars(cautious_norm, inv_rms,
                       _network.hidden_bias(theta, scalars, rows + switch_rows))


def _switch_tensor_features(config: LOConfig, sums, sum_sq, switch_steps: dict):
  """(the per-tensor features of each switch turned on, ``[n, k]`` each, their rows of
  ``w1``), from its statistics-pass sums and the normalized features' sums of squares."""
  by_name = {n: sum_sq[:, i] for i, n in enumerate(normalized_names(config))}
  values, rows, start = [], [], NUM_ELEMENTWISE
  for switch in config.switches_on:
    own_sums = sums[:, start:start + switch.statistic_sums]
    start += switch.statistic_sums
    if switch.tensor_features:
      values.append(switch.tensor_feature_values(config, own_sums, by_name,
                                                 switch_steps[switch.name]))
      rows += [config.feature_names.index(n) for n in switch.tensor_features]
  assert start == sums.shape[1], (start, sums.shape)
  return values, rows


def tensor_update(config: LOConfig, theta: dict, ctx: StepContext, inp: LeafInputs,
                  scalars: TensorScalars):
  """The update of one tensor: features, MLP and classical mix in one elementwise pass.

  Each switch turned on adds its candidates, its per-parameter features present on this
  tensor (RMS-normalized and clipped like the others) and may change the mix
  (:class:`metaopt.lopt._switches.Switch`).
  """
  dtype = inp.g.dtype
  cands, raw, bounded, inverse_denominator = elementwise_features(config, ctx, inp)
  cautious_norm = scalars.cautious_norm.astype(dtype)
  cands = cands._replace(cautious_adam=cands.cautious_adam * cautious_norm)
  raw[_CAUTIOUS] = raw[_CAUTIOUS] * cautious_norm
  clip = config.feature_clip
  inv_rms = scalars.inv_rms.astype(dtype)
  feats = [jnp.clip(f * inv_rms[i], -clip, clip) for i, f in enumerate(raw)] + bounded
  rows, mix = list(range(len(feats))), theta["mix"]
  columns = normalized_names(config)
  for switch in config.switches_on:
    values, mix = switch.leaf_features(config, theta, inp, mix)
    for name, value in values:
      feats.append(jnp.clip(value * inv_rms[columns.index(name)], -clip, clip))
      rows.append(config.feature_names.index(name))
  direction, log_mag = _network.mlp_outputs_elementwise(theta, feats, scalars.bias,
                                                         dtype, rows)
  mix = mix.astype(dtype)
  cands = tuple(cands) + tuple(switch_candidates(config, ctx, inp, inverse_denominator))
  classical = sum(mix[k] * c for k, c in enumerate(cands) if c is not None)
  step = classical + config.step_mult * direction
  log_mag = jnp.clip(config.log_step_mult * log_mag, -config.max_log_step,
                     config.max_log_step)
  scale = ctx.learning_rate * inp.mup_scale * jnp.exp(theta["log_lr"].astype(dtype))
  return -scale * step * jnp.exp(log_mag)
