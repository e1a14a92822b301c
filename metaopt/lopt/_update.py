"""The learned optimizer's pure init/update functions.

One step, for every tensor (leaf) W with gradient g and parameter x:

1. Advance the raw state with :mod:`metaopt.features`: momentum EMAs at three decays,
   Adam's second moment v, Adafactor row/column accumulators, TAM's momentum and
   smoothed torque cosine, LaProp's momentum of normalized gradients, and MoMo's loss
   and <g, x> EMAs (global scalars, only when ``value`` is given).
2. Classical candidate directions c_k from the raw state (SGD-M, Adam, Lion, cautious
   Adam, TAM, AdaTAM, AdEMAMix, MoMo-Adam, Grams, LaProp, decoupled weight decay).
3. Features: per-tensor RMS-normalized per-parameter quantities, bounded indicators,
   per-tensor scalars and time; a residual MLP maps them to (d, m) per parameter.
4. update = -lr * s_mup * exp(log_lr) * (sum_k mix_k c_k + lambda1 d) * exp(lambda2 m),
   s_mup = base_fan_in / fan_in for hidden tensors (1 otherwise, or when muP is off).
   With ``horizon_decay="linear"`` and ``num_steps`` given, lr is multiplied by
   1 - (t - 1) / num_steps at step t (1-based).

The state holds six parameter-shaped buffers (three momenta, v, TAM and LaProp
momenta), small factored accumulators and scalars; never the parameters.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metaopt import features as F
from metaopt.lopt import _network
from metaopt.lopt._config import (BOUNDED_FEATURES, CANDIDATE_NAMES, NORMALIZED_FEATURES,
                                  TENSOR_FEATURES, TIME_TAUS, LOConfig)

Tree = Any


class LOState(NamedTuple):
  """State of the learned optimizer (arrays only; never the parameters)."""

  count: jax.Array  # int32 scalar: updates applied so far.
  momenta: tuple  # (fast, mid, slow) EMAs of g, each shaped like params.
  second_moment: Tree  # EMA of g^2.
  factored: Tree  # Adafactor FactoredMoment per leaf.
  tam_momentum: Tree  # TAM's m_t = beta m + (eps + d_t) g.
  torque_ema: Tree  # TAM's smoothed cosine s_hat, one scalar per leaf.
  laprop_momentum: Tree  # EMA of g / (sqrt(v_hat) + eps).
  loss_ema: jax.Array  # MoMo's fbar (b1-EMA of the loss from zero).
  grad_param_ema: jax.Array  # MoMo's gamma (b1-EMA of <g, x> from zero).
  mup_scale: Tree  # base_fan_in / fan_in per hidden leaf, 1 elsewhere (scalars).
  num_nonfinite: jax.Array  # int32 scalar: steps skipped for non-finite grads or loss.


def state_dtype(leaf) -> jnp.dtype:
  """float32 state for low-precision params; float64 when the params are."""
  return jnp.promote_types(jnp.result_type(leaf), jnp.float32)


def init_state(params: Tree, mup_scale: Tree) -> LOState:
  zeros = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), state_dtype(x)), params)
  scalar_dtype = jnp.result_type(*[state_dtype(x) for x in jax.tree.leaves(params)] or
                                 [jnp.float32])
  return LOState(
      count=jnp.zeros([], jnp.int32),
      momenta=(zeros, zeros, zeros),
      second_moment=zeros,
      factored=jax.tree.map(
          lambda x: jax.tree.map(lambda a: a.astype(state_dtype(x)), F.factored_init(x)),
          params),
      tam_momentum=zeros,
      torque_ema=jax.tree.map(lambda x: jnp.zeros([], state_dtype(x)), params),
      laprop_momentum=zeros,
      loss_ema=jnp.zeros([], scalar_dtype),
      grad_param_ema=jnp.zeros([], scalar_dtype),
      mup_scale=jax.tree.map(lambda x, s: jnp.asarray(s, state_dtype(x)), params,
                             mup_scale),
      num_nonfinite=jnp.zeros([], jnp.int32),
  )


class StepContext(NamedTuple):
  """Scalars shared by every tensor in one step (the cross-tensor part of the rules)."""

  t: jax.Array  # 1-based step.
  bc_fast: jax.Array  # 1 - b_fast^t
  bc_v: jax.Array  # 1 - b2^t
  bc_laprop: jax.Array  # 1 - b_laprop^t
  momo_tau: jax.Array  # MoMo-Adam's step (its cap alpha / bc_fast without a loss).
  polyak_ratio: jax.Array  # momo_tau / cap in [0, 1] (1 without a loss).
  has_loss: jax.Array  # 1.0 when value= was given.
  time: jax.Array  # [len(TIME_TAUS) + 2] time features.


def _leafwise(fn, *trees):
  return jax.tree.map(fn, *trees)


def update(config: LOConfig, theta: dict, grads: Tree, state: LOState, params: Tree, *,
           value=None, num_steps=None, learning_rate=1.0):
  """One learned-optimizer step; returns (updates, new_state). Pure and jittable."""
  b_fast, b_mid, b_slow = config.momentum_decays
  b2 = config.second_moment_decay
  sdt = jax.tree.map(lambda m: m.dtype, state.second_moment)
  g = jax.tree.map(lambda gr, dt: gr.astype(dt), grads, sdt)
  x = jax.tree.map(lambda p, dt: p.astype(dt), params, sdt)
  count = optax.safe_increment(state.count)
  scalar_dt = state.loss_ema.dtype
  t = count.astype(scalar_dt)

  # 1. Raw state.
  m_fast = F.update_ema(state.momenta[0], g, b_fast)
  m_mid = F.update_ema(state.momenta[1], g, b_mid)
  m_slow = F.update_ema(state.momenta[2], g, b_slow)
  v = F.update_second_moment(state.second_moment, g, b2)
  factored = jax.tree.map(lambda acc, gr: F.update_factored(acc, gr, config.factored_decay),
                          state.factored, g,
                          is_leaf=lambda a: isinstance(a, F.FactoredMoment))
  s = _leafwise(F.torque_cosine, state.tam_momentum, g)
  s_hat = _leafwise(lambda sh, c: F.update_torque_ema(sh, c, config.tam_gamma),
                    state.torque_ema, s)
  damping = _leafwise(F.tam_damping, s_hat)
  tam_m = _leafwise(
      lambda m, gr, d: F.update_tam_momentum(m, gr, config.tam_beta, d, config.tam_eps),
      state.tam_momentum, g, damping)
  bc_v = 1 - jnp.asarray(b2, scalar_dt)**t
  laprop_in = _leafwise(lambda gr, vv: gr / (jnp.sqrt(vv / bc_v) + config.laprop_eps), g, v)
  laprop_m = F.update_ema(state.laprop_momentum, laprop_in, config.laprop_b1)

  # MoMo-Adam's global scalars (Schaipp et al, arXiv:2305.07583, Alg. 2).
  bc_fast = 1 - jnp.asarray(b_fast, scalar_dt)**t
  momo_cap = config.momo_alpha / bc_fast
  if value is None:
    loss_ema, gp_ema = state.loss_ema, state.grad_param_ema
    momo_tau = momo_cap
    has_loss = jnp.zeros([], scalar_dt)
  else:
    loss_ema = b_fast * state.loss_ema + (1 - b_fast) * jnp.asarray(value, scalar_dt)
    gp_ema = b_fast * state.grad_param_ema + (1 - b_fast) * F.tree_vdot(g, x)
    precond = _leafwise(lambda vv: config.adam_eps + jnp.sqrt(vv / bc_v), v)
    d_norm = F.tree_vdot(m_fast, _leafwise(jnp.divide, m_fast, precond))
    d_dot_x = F.tree_vdot(m_fast, x)
    momo_tau = F.momo_polyak_step(config.momo_alpha, loss_ema, gp_ema, d_dot_x, d_norm,
                                  lower_bound=bc_fast * config.momo_lower_bound,
                                  denom_eps=jnp.finfo(float).eps, max_step=momo_cap)
    has_loss = jnp.ones([], scalar_dt)
  frac = (jnp.zeros([], jnp.float32) if num_steps is None else
          jnp.clip(count.astype(jnp.float32) / num_steps, 0.0, 1.0))
  time = jnp.concatenate([
      jnp.tanh(count.astype(jnp.float32) / jnp.asarray(TIME_TAUS, jnp.float32)),
      jnp.stack([frac, jnp.float32(num_steps is not None)])])
  ctx = StepContext(t=t, bc_fast=bc_fast, bc_v=bc_v,
                    bc_laprop=1 - jnp.asarray(config.laprop_b1, scalar_dt)**t,
                    momo_tau=momo_tau, polyak_ratio=momo_tau / momo_cap,
                    has_loss=has_loss, time=time)

  if config.horizon_decay == "linear" and num_steps is not None:
    learning_rate = learning_rate * jnp.clip(
        1 - (count.astype(jnp.float32) - 1) / num_steps, 1 / num_steps, 1.0)
  leaf_update = lambda *a: _leaf_update(config, theta, ctx, learning_rate, *a)
  updates = jax.tree.map(leaf_update, g, x, m_fast, state.momenta[1], m_slow, v, factored,
                         tam_m,
                         damping, laprop_m, state.mup_scale, params,
                         is_leaf=lambda a: isinstance(a, F.FactoredMoment))
  new_state = LOState(count=count, momenta=(m_fast, m_mid, m_slow), second_moment=v,
                      factored=factored, tam_momentum=tam_m, torque_ema=s_hat,
                      laprop_momentum=laprop_m, loss_ema=loss_ema,
                      grad_param_ema=gp_ema, mup_scale=state.mup_scale,
                      num_nonfinite=state.num_nonfinite)
  return updates, new_state


# Tensors larger than this are processed in chunks of this many elements, so the
# per-parameter feature matrix never exceeds _CHUNK x F floats.
_CHUNK = 1 << 18


def candidate_directions(config: LOConfig, ctx: StepContext, inp: dict, cautious_norm):
  """The classical directions (before the learning rate; optax sign: to be subtracted).

  ``inp["m_mid_prev"]`` is the mid momentum *before* this step's update: Lion
  interpolates the previous momentum with the new gradient. ``cautious_norm`` is the
  per-tensor renormalization 1 / max(mean(mask), 1e-3) of the cautious mask.
  """
  g, m_fast = inp["g"], inp["m_fast"]
  m_hat = m_fast / ctx.bc_fast
  sqrt_v_hat = jnp.sqrt(inp["v"] / ctx.bc_v)
  adam = m_hat / (sqrt_v_hat + config.adam_eps)
  by_name = dict(
      sgdm=m_fast / (1 - config.momentum_decays[0]),
      adam=adam,
      lion=jnp.sign(config.lion_b1 * inp["m_mid_prev"] + (1 - config.lion_b1) * g),
      cautious_adam=adam * ((adam * g > 0).astype(g.dtype) * cautious_norm),
      tam=inp["tam_m"],
      adatam=inp["tam_m"] / (sqrt_v_hat + config.adatam_eps),
      ademamix=(m_hat + config.ademamix_alpha * inp["m_slow"]) / (sqrt_v_hat +
                                                                 config.adam_eps),
      momo_adam=ctx.momo_tau * m_fast / (config.adam_eps + sqrt_v_hat),
      grams=jnp.sign(g) * jnp.abs(m_hat / (sqrt_v_hat + config.grams_eps)),
      laprop=inp["laprop_m"] / ctx.bc_laprop,
      weight_decay=inp["x"],
  )
  return by_name, sqrt_v_hat


def _raw_features(config, ctx, inp, cautious_norm):
  """(candidates by name, per-element features by name) from the raw inputs."""
  cands, sqrt_v_hat = candidate_directions(config, ctx, inp, cautious_norm)
  g = inp["g"]
  feats = dict(grad=g, param=inp["x"], momentum_fast=inp["m_fast"],
               momentum_mid=inp["m_mid_prev"], momentum_slow=inp["m_slow"],
               rsqrt_second_moment=1 / (sqrt_v_hat + 1e-8), adam=cands["adam"],
               adafactor_grad=g * inp["rsqrt_fact"],
               adafactor_momentum=inp["m_fast"] * inp["rsqrt_fact"],
               tam_momentum=inp["tam_m"], laprop=inp["laprop_m"], lion_sign=cands["lion"],
               cautious_adam=cands["cautious_adam"], grams=cands["grams"],
               ademamix=cands["ademamix"],
               cautious_agreement=(cands["adam"] * g > 0).astype(g.dtype))
  return cands, feats


def _log_rms(a):
  return jnp.log10(F.tensor_rms(a) + 1e-8) / 4.0


def _leaf_update(config, theta, ctx, learning_rate, g, x, m_fast, m_mid_prev, m_slow, v,
                 fact, tam_m, damping, laprop_m, mup_scale, param):
  dtype = g.dtype
  size = jnp.size(g)
  rsqrt_fact = jax.lax.rsqrt(F.factored_second_moment(fact, g) + 1e-30)
  inp = {k: jnp.ravel(a) for k, a in dict(
      g=g, x=x, m_fast=m_fast, m_mid_prev=m_mid_prev, m_slow=m_slow, v=v, tam_m=tam_m,
      laprop_m=laprop_m, rsqrt_fact=rsqrt_fact).items()}
  # Per-tensor statistics (the cautious renormalization, then the feature RMS).
  adam_full = candidate_directions(config, ctx, inp, 1.0)[0]["adam"]
  cautious_norm = 1 / jnp.maximum(jnp.mean((adam_full * inp["g"] > 0).astype(dtype)), 1e-3)
  num_norm = len(NORMALIZED_FEATURES)

  def stacked_features(chunk):
    cands, feats = _raw_features(config, ctx, chunk, cautious_norm)
    names = NORMALIZED_FEATURES + BOUNDED_FEATURES
    return cands, jnp.stack([feats[n] for n in names], axis=-1)

  def sum_squares(chunk):
    stacked = stacked_features(chunk)[1][:, :num_norm]
    return jnp.sum(jnp.where(chunk["valid"][:, None], jnp.square(stacked), 0), axis=0)

  tensor = [damping, ctx.polyak_ratio, ctx.has_loss, _log_rms(x), _log_rms(g)]
  assert len(tensor) == len(TENSOR_FEATURES)
  scalars = [f.astype(jnp.float32) for f in tensor] + list(ctx.time)
  bias = _network.hidden_bias(theta, scalars, offset=num_norm + len(BOUNDED_FEATURES))
  mix = theta["mix"].astype(dtype)
  scale = learning_rate * mup_scale * jnp.exp(theta["log_lr"].astype(dtype))

  def per_element(chunk, inv_rms):
    cands, stacked = stacked_features(chunk)
    classical = sum(mix[k] * cands[n] for k, n in enumerate(CANDIDATE_NAMES))
    clip = config.feature_clip
    normalized = jnp.clip(stacked[:, :num_norm] * inv_rms, -clip, clip)
    feats = jnp.concatenate([normalized, stacked[:, num_norm:]], axis=-1)
    direction, log_mag = _network.mlp_outputs(theta, feats, bias, dtype)
    step = classical + config.step_mult * direction
    log_mag = jnp.clip(config.log_step_mult * log_mag, -config.max_log_step,
                       config.max_log_step)
    return -scale * step * jnp.exp(log_mag)

  if size <= _CHUNK:
    stacked = stacked_features(inp)[1][:, :num_norm]
    inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(stacked), axis=0) + 1e-8)
    update = per_element(inp, inv_rms)
  else:  # Two passes over chunks: statistics, then the MLP.
    chunks = _split_chunks(inp, size)
    sums = jnp.sum(jax.lax.map(sum_squares, chunks), axis=0)
    inv_rms = jax.lax.rsqrt(sums / size + 1e-8)
    update = jax.lax.map(lambda c: per_element(c, inv_rms), chunks).reshape(-1)[:size]
  return update.reshape(jnp.shape(param)).astype(jnp.result_type(param))


def _split_chunks(inputs: dict, size: int) -> dict:
  """Flat inputs padded and reshaped to [num_chunks, _CHUNK], with a validity mask."""
  num_chunks = -(-size // _CHUNK)
  pad = num_chunks * _CHUNK - size
  out = {k: jnp.pad(a, (0, pad)).reshape(num_chunks, _CHUNK) for k, a in inputs.items()}
  out["valid"] = (jnp.arange(num_chunks * _CHUNK) < size).reshape(num_chunks, _CHUNK)
  return out
