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
   max(1 - (t - 1) / num_steps, 1 / num_steps) at step t (1-based): past the horizon
   the last scheduled step size holds. With ``warmup_fraction = w > 0`` (and
   ``num_steps``) it is also multiplied by min(1, t / max(w num_steps, 1)).

With ``config.muon`` (Jordan et al, "Muon: An optimizer for hidden layers in neural
networks", 2024) two candidates join: on each hidden matrix W (by muP role, conv
kernels as one ``[fan_in, fan_out]`` matrix) Muon's direction

   c_muon = s NS_5(mu_hat),  mu_t = beta mu_{t-1} + (1 - beta) g_t,
   mu_hat = beta mu_t / (1 - beta^(t+1)) + (1 - beta) g_t / (1 - beta^t),
   s = sqrt(max(1, fan_out / fan_in)),

(zero on other tensors; NS_5 the quintic Newton-Schulz iteration of
:func:`metaopt.features.newton_schulz_orthogonalize`), which is also an MLP feature,
and Nesterov Adam ``c_nadam = m_hat_nesterov / (sqrt(v_hat) + eps)`` on every tensor;
on hidden matrices the weights are ``mix + hidden_mix``. ``mu`` is the momentum EMA
of ``momentum_decays`` with decay beta, or a buffer of its own (hidden matrices only).

With ``config.step_size_features`` three per-tensor scalars join the MLP through its
hidden bias: the signals the learning-rate-free D-Adaptation (Defazio & Mishchenko,
"Learning-Rate-Free Learning by D-Adaptation", arXiv:2301.07733, 2023) and Prodigy
(Mishchenko & Defazio, "Prodigy: An Expeditiously Adaptive Parameter-Free Learner",
arXiv:2306.06101, 2023) set their step from, whose estimate of the distance to the
solution is ``d_hat = sum_k lambda_k <g_k, x_0 - x_k> / ||sum_k lambda_k g_k||``
(Prodigy Alg. 1). With x_0 the parameters at ``init``, x = x_{t-1} the parameters the
step is given and m the fast momentum after this step's gradient, per tensor:

   log_distance        = log10(r + 1e-8) / 4,
                         r = RMS(x - x_0) / max(RMS(x_0), RMS(x))   (0 if both are 0),
   displacement_cosine = <m, x_0 - x> / (||m|| ||x_0 - x||)         (0 if either is 0),
   loss_trend          = (fbar - fslow) / (|fbar| + |fslow|)        (global; 0 without
                         ``value``), fbar = MoMo's b_fast-EMA of the loss / (1 - b_fast^t),
                         fslow = its ``loss_trend_decay``-EMA / (1 - decay^t).

Each is scale-free per tensor (unchanged when a tensor and its initialization are
multiplied by s > 0, as meta-training's 10^U(-3, 3) reparametrization does; the
loss trend when the loss is multiplied by a constant), finite at step 1 (x = x_0:
-2, 0, 0) and bounded: [-2, 0.08], [-1, 1], [-1, 1]. r compares the distance with
the tensor's own size; the max keeps it finite for zero-initialized tensors (biases),
whose r is 1 once they move (they have no scale of their own to compare with; a fixed
floor would not be scale-free). The cosine is Prodigy's numerator <g, x_0 - x>
normalized: positive while the momentum keeps pointing along the path travelled (the
step may grow), negative once it points back to x_0 (overshoot). A rising loss is the
classic sign of a step too large. Their three sums (||x - x_0||^2, ||x_0||^2,
<m, x_0 - x>; ||x||^2 and ||m||^2 are the param and momentum features' sums already)
are taken by the statistics pass: no extra pass over the buffers, one more buffer
(x_0) in the state.

How it computes (the engine). No per-parameter feature matrix is built and nothing runs
serially over chunks. Per tensor: one fused pass advances the moments and gives the raw
sums (TAM's torque cosine, MoMo's inner products); then, with the cross-tensor scalars
known, TAM's and LaProp's momenta; one fused reduction pass gives every feature
statistic (the cautious mask's mean, the feature sums of squares, the parameter and
gradient RMS); and one fused elementwise pass builds the features, runs the MLP as
per-output multiply-adds (a ``[n, 27] @ [27, 8]`` matmul on skinny operands is not what
XLA fuses) and writes the update. The per-tensor scalar math runs once for all tensors,
as ``[num_tensors, k]`` arrays. On blocks of over 2^20 elements the statistics and
update passes each read their inputs through their own runtime identity
(:func:`_on_own_copy`), so XLA does not merge their feature computations and write the
shared features to memory.

Where the passes run (:class:`_Blocks`). In the flat layout (unsharded trees,
:mod:`metaopt.lopt._layout`) every tensor of up to 2^18 elements lives in one
``[rows, 128]`` buffer: each pass runs once over it and its per-tensor sums are
segment sums, so compile time does not grow with the number of tensors (XLA:CPU
compiles each fused program separately). Larger tensors, and all tensors of a sharded
tree, run each in its own shape, so a sharded parameter keeps its sharding and no
parameter is gathered; small ones of equal shape and dtype are then batched by one
vmapped program. Adafactor's factored accumulators always run per tensor.

The orthogonalized candidate is per-matrix work (matmuls): it runs per hidden matrix
between the first pass and the statistics pass, once per step, and hands the direction
and its sum of squares to the later passes (in the flat layout those matrices keep their
own buffers). With the switch off none of it is traced.

The state holds six parameter-shaped buffers (three momenta, v, TAM and LaProp
momenta; with ``muon`` and a Muon decay none of the three has, a fourth momentum on
hidden matrices; with ``step_size_features`` a copy of the initial parameters x_0),
small factored accumulators and scalars; never the current parameters.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt import features as F
from metaopt.lopt import _layout
from metaopt.lopt import _network
from metaopt.lopt._config import (BOUNDED_FEATURES, CANDIDATE_NAMES, MUON_CANDIDATES,
                                  NORMALIZED_FEATURES, STEP_SIZE_FEATURES,
                                  TENSOR_FEATURES, TIME_TAUS, LOConfig)

Tree = Any


class LOState(NamedTuple):
  """State of the learned optimizer (arrays only; never the parameters)."""

  count: jax.Array  # int32 scalar: updates applied so far.
  momenta: tuple  # (fast, mid, slow) EMAs of g, each shaped like params; with
  # LOConfig.muon and a Muon decay of its own, a fourth (Muon's; scalar placeholders on
  # the tensors Muon does not orthogonalize).
  second_moment: Tree  # EMA of g^2.
  factored: Tree  # Adafactor FactoredMoment per leaf.
  tam_momentum: Tree  # TAM's m_t = beta m + (eps + d_t) g.
  torque_ema: Tree  # TAM's smoothed cosine s_hat: one scalar per leaf ([num_tensors] flat).
  laprop_momentum: Tree  # EMA of g / (sqrt(v_hat) + eps).
  loss_ema: jax.Array  # MoMo's fbar (b1-EMA of the loss from zero).
  grad_param_ema: jax.Array  # MoMo's gamma (b1-EMA of <g, x> from zero).
  mup_scale: Tree  # base_fan_in / fan_in per hidden leaf, 1 elsewhere (scalars).
  num_nonfinite: jax.Array  # int32 scalar: steps skipped for non-finite grads or loss.
  # With LOConfig.step_size_features (None without):
  initial_params: Any = None  # x_0, the parameters at init (a parameter-shaped buffer).
  loss_ema_slow: Any = None  # loss_trend_decay-EMA of the loss from zero.


def state_dtype(leaf) -> jnp.dtype:
  """float32 state for low-precision params; float64 when the params are."""
  return jnp.promote_types(jnp.result_type(leaf), jnp.float32)


def _zeros_like(leaf, dtype):
  """New zeros with ``leaf``'s shape and sharding (a committed array's, a
  ``jax.ShapeDtypeStruct``'s, or a traced array's under an explicit mesh)."""
  return jnp.zeros_like(leaf, dtype=dtype)


def _copy_like(leaf, dtype):
  """A fresh copy of ``leaf`` in ``dtype``, with its sharding (``_zeros_like`` plus the
  values: never the parameter's own buffer, which a train step may donate). A
  ``jax.ShapeDtypeStruct`` has no values: zeros stand in (shape-only uses)."""
  zeros = _zeros_like(leaf, dtype)
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return zeros
  return zeros + jnp.asarray(leaf).astype(dtype)


def init_state(params: Tree, mup_scale: Tree, config: LOConfig | None = None,
               muon_fan_in: Tree | None = None, *, flat: bool | None = None) -> LOState:
  """A fresh state; works on arrays, sharded arrays and ``jax.ShapeDtypeStruct`` trees.

  An unsharded (or replicated) tree of two tensors or more gets the flat layout
  (:mod:`metaopt.lopt._layout`): each parameter-shaped buffer is a ``_layout.Packed``,
  one ``[rows, 128]`` array holding the tensors of up to ``_layout.MAX_FLAT`` elements
  and the larger tensors' own buffers. Otherwise each buffer is a tree shaped like the
  params, and a sharded parameter's buffers take its sharding. The factored
  accumulators are per tensor in both: reductions of a parameter-shaped buffer, sharded
  like the axes they keep. ``flat=False`` forces the per-tensor layout (``True``
  cannot force the flat one where it does not apply). ``config`` and ``muon_fan_in``
  (see :func:`update`) are needed only with ``config.muon``; the matrices Muon
  orthogonalizes keep their own buffers. With ``config.step_size_features`` the state
  also holds a copy of ``params`` (x_0, in the same layout as the other buffers).
  """
  leaves = jax.tree.leaves(params)
  dtypes = [state_dtype(x) for x in leaves]
  zeros = lambda: jax.tree.map(lambda x: _zeros_like(x, state_dtype(x)), params)
  fan_in = None
  if config is not None and config.muon:
    fan_in = _check_muon_fan_in(params, muon_fan_in)
  apart = _muon_tensors(fan_in)
  can_flatten, sharding = _layout.flat_sharding(leaves, dtypes)
  small, large = _layout.partition([jnp.shape(a) for a in leaves], apart)
  flat = can_flatten and flat is not False and bool(small)
  if flat:
    layout = _layout.FlatLayout(tuple(jnp.shape(leaves[i]) for i in small))

  def new_buffer():  # every state leaf its own array: a train step may donate them all.
    if not flat:
      return zeros()
    zero_leaves = jax.tree.leaves(zeros())
    return _layout.Packed(_layout.zeros(layout, dtypes[0], sharding),
                          tuple(zero_leaves[i] for i in large))

  initial = None
  if config is not None and config.step_size_features:
    initial = jax.tree.map(lambda x: _copy_like(x, state_dtype(x)), params)
    if flat:
      copies = jax.tree.leaves(initial)
      packed = _layout.zeros(layout, dtypes[0], sharding) + _layout.pack(
          layout, [copies[i] for i in small])
      initial = _layout.Packed(packed, tuple(copies[i] for i in large))
  momenta = (new_buffer(), new_buffer(), new_buffer())
  if config is not None and config.muon_momentum == 3:  # per tensor in both layouts.
    momenta += (jax.tree.map(lambda x, z, f: z if f else jnp.zeros([], state_dtype(x)),
                             params, zeros(), fan_in),)
  scalar_dtype = jnp.result_type(*dtypes or [jnp.float32])
  return LOState(
      count=jnp.zeros([], jnp.int32),
      momenta=momenta,
      second_moment=new_buffer(),
      factored=jax.tree.map(F.factored_init, zeros()),
      tam_momentum=new_buffer(),
      torque_ema=(jnp.zeros([len(leaves)], dtypes[0]) if flat else
                  jax.tree.map(lambda x: jnp.zeros([], state_dtype(x)), params)),
      laprop_momentum=new_buffer(),
      loss_ema=jnp.zeros([], scalar_dtype),
      grad_param_ema=jnp.zeros([], scalar_dtype),
      mup_scale=jax.tree.map(lambda x, s: jnp.array(s, state_dtype(x)), params,
                             mup_scale),
      num_nonfinite=jnp.zeros([], jnp.int32),
      initial_params=initial,
      loss_ema_slow=None if initial is None else jnp.zeros([], scalar_dtype),
  )


def is_flat(state: LOState) -> bool:
  """Whether ``state`` holds its buffers in the flat layout."""
  return isinstance(state.second_moment, _layout.Packed)


def parameter_shapes(state: LOState) -> list[tuple[int, ...]]:
  """The shape of each parameter the state was made for (read off the factored
  accumulators, which exist per tensor in both layouts)."""
  shapes = []
  for acc in jax.tree.leaves(state.factored, is_leaf=lambda a: isinstance(a, F.FactoredMoment)):
    row, col = jnp.shape(acc.row), jnp.shape(acc.col)
    shapes.append(row if not col else row + col[-1:])
  return shapes


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
  # accumulators (F.FactoredMoment), from which each pass rebuilds it (_on_own_copy).
  mup_scale: jax.Array
  muon: Any = None  # Muon's direction on a hidden matrix (LOConfig.muon), else None.
  x0: Any = None  # the initial parameters (LOConfig.step_size_features), else None.


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


assert Candidates._fields == CANDIDATE_NAMES + MUON_CANDIDATES


def candidate_directions(config: LOConfig, ctx: StepContext, inp: LeafInputs,
                         cautious_norm) -> tuple[Candidates, Any]:
  """The classical directions (before the learning rate; optax sign: to be subtracted).

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


def _elementwise_features(config, ctx, inp: LeafInputs):
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


_ROW = _layout.ROW  # row length of the variadic reduction over long vectors.


def _row_sums(arrays: list) -> tuple:
  """Sums over the last axis of each array (all of one shape), in one pass.

  One variadic ``lax.reduce`` over all operands: one loop over the buffer into which
  XLA fuses the elementwise producers (separate ``jnp.sum`` calls each become their own
  reduction on XLA:CPU and force every operand to be written to memory first). That
  loop accumulates sequentially, so it only runs along rows.
  """
  zeros = tuple(jnp.zeros([], a.dtype) for a in arrays)
  add = lambda acc, x: tuple(u + w for u, w in zip(acc, x))
  return jax.lax.reduce(tuple(arrays), zeros, add, (arrays[0].ndim - 1,))


def _sum_all(arrays: list) -> list:
  """The sum of every element of each array (all of one shape), in one pass.

  Row sums (:func:`_row_sums`), then the row sums added by ``jnp.sum``, keeping float32
  error at the level of a plain sum. Short vectors and scalars use ``jnp.sum``
  directly; long vectors are reshaped to rows.
  """
  if _layout.explicitly_sharded(arrays[0]):  # no reshape across a sharded axis
    if arrays[0].ndim < 2:
      return [jnp.sum(a) for a in arrays]
    return [jnp.sum(r) for r in _row_sums(arrays)]
  if arrays[0].ndim < 2:
    size = arrays[0].size
    if size < 2 * _ROW or size % _ROW:
      return list(jnp.sum(jnp.stack(arrays).reshape(len(arrays), -1), axis=1))
    arrays = [a.reshape(-1, _ROW) for a in arrays]
  stacked = jnp.stack([r.reshape(-1) for r in _row_sums(arrays)])
  return list(jnp.sum(stacked, axis=1))


class _Blocks:
  """The buffers the passes run on: small tensors in one flat buffer, the others alone.

  Per tensor (sharded trees, and tensors above ``_layout.MAX_FLAT`` elements): a pass
  runs on each tensor in its own shape (equal shapes batched by :func:`_map_grouped`)
  and its sums are that tensor's. Flat (:mod:`metaopt.lopt._layout`): a pass runs once
  over the flat buffer and its sums are segment sums, one row per tensor. Either way
  the driver sees per-tensor sums as ``[num_tensors, k]`` (tensor order) and hands
  per-tensor values back through :meth:`split`. Block order: the flat block (when
  there is one), then the other tensors in tree order.
  """

  def __init__(self, keys: list, flat: bool, count: jax.Array, apart: set = frozenset()):
    self.keys = keys
    small, large = (_layout.partition([k[0] for k in keys], apart) if flat else
                    ([], list(range(len(keys)))))
    self.small, self.large = small, large
    self.layout = _layout.FlatLayout(tuple(keys[i][0] for i in small)) if small else None
    # min(count, 0) is 0 (counts are non-negative) but not provably so for XLA.
    self.ids = None if self.layout is None else _layout.row_tensor_ids(
        self.layout, jnp.minimum(count, 0).astype(jnp.int32))
    self.order = np.argsort(np.asarray(small + large, np.int64))  # blocks -> tensor order

  def tensor_of_blocks(self) -> list:
    """Per block: its tensor's index (tree order), None for the flat block."""
    return ([None] if self.layout is not None else []) + list(self.large)

  def block_of(self, i: int) -> int:
    """The block of tensor ``i``, which keeps its own buffer."""
    return self.tensor_of_blocks().index(i)

  def _flat_sums(self, terms: list, masked: bool = False) -> jax.Array:
    if masked:
      valid = _layout.valid_mask(self.layout, self.ids)
      terms = [jnp.where(valid, t, jnp.zeros([], t.dtype)) for t in terms]
    return _layout.segment_sums(self.layout, self.ids, jnp.stack(_row_sums(terms)))

  @staticmethod
  def _tensor_sums(terms: list, masked: bool = False) -> jax.Array:
    del masked  # a tensor's own buffer has no padding.
    return jnp.stack(_sum_all(terms))

  def map(self, fn, *args: list) -> list:
    """``fn(sums, *block_args)`` over the blocks; ``args`` are per-block lists and
    ``sums(terms, masked=False)`` gives the block's per-tensor sums of ``terms``."""
    out = []
    rest = list(zip(*args))
    if self.layout is not None:
      out.append(fn(self._flat_sums, *rest[0]))
      rest = rest[1:]
    keys = [self.keys[i] for i in self.large]
    return out + _map_grouped(lambda *a: fn(self._tensor_sums, *a), keys, rest)

  def per_tensor(self, results: list, dtype) -> jax.Array:
    """``[num_tensors, k]`` in tensor order from the blocks' sums."""
    rows = []
    if self.layout is not None:
      rows.append(results[0].astype(dtype))
      results = results[1:]
    rows += [r[None].astype(dtype) for r in results]
    return jnp.concatenate(rows)[self.order]

  def split(self, per_tensor: Tree) -> list:
    """Per-tensor values (leaves ``[num_tensors, ...]``) as one entry per block."""
    out = []
    if self.layout is not None:
      idx = np.asarray(self.small)
      out.append(jax.tree.map(lambda a: _layout.broadcast_rows(self.ids, a[idx]),
                              per_tensor))
    return out + [jax.tree.map(lambda a, i=i: a[i], per_tensor) for i in self.large]

  def pack(self, leaves: list) -> list:
    """Tensor-shaped arrays as one entry per block."""
    out = [] if self.layout is None else [_layout.pack(self.layout,
                                                       [leaves[i] for i in self.small])]
    return out + [leaves[i] for i in self.large]

  def unpack(self, blocks: list) -> list:
    """Inverse of :meth:`pack`: tensors in tree order."""
    leaves = []
    if self.layout is not None:
      leaves = _layout.unpack(self.layout, blocks[0])
      blocks = blocks[1:]
    leaves += list(blocks)
    return [leaves[j] for j in self.order]


def _log_rms(sum_sq, size):
  return jnp.log10(jnp.sqrt(sum_sq / size) + 1e-8) / 4.0


# The per-tensor sums of the first pass: TAM's torque cosine, then MoMo's inner products.
_TORQUE_SUMS = 3


def _factored_pass(decay, finite, acc: F.FactoredMoment, g):
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
  return acc, _factored_rsqrt(acc, g)


def _first_pass(config: LOConfig, bc_v, with_loss: bool, sums, m_fast, m_mid, m_slow, v,
                tam_m, g, x):
  """Moments from :mod:`metaopt.features` and the raw per-tensor sums, in one pass.

  Sums: <m_tam, g>, ||m_tam||^2, ||g||^2 (TAM's torque cosine, before this step's TAM
  momentum) and, with a loss, <g, x>, <m, m / (sqrt(v_hat) + eps)>, <m, x> (MoMo-Adam).
  Every term is zero on the flat layout's padding.
  """
  b_fast, b_mid, b_slow = config.momentum_decays
  m_fast = F.update_ema(updates=g, moments=m_fast, decay=b_fast)
  v = F.update_second_moment(v, g, config.second_moment_decay)
  moments = Moments(m_fast=m_fast, m_mid=F.update_ema(updates=g, moments=m_mid, decay=b_mid),
                    m_slow=F.update_ema(updates=g, moments=m_slow, decay=b_slow), v=v)
  terms = [tam_m * g, jnp.square(tam_m), jnp.square(g)]
  if with_loss:
    direction = m_fast * F.inverse_adam_denominator(v * (1 / bc_v), config.adam_eps)
    terms += [g * x, m_fast * direction, m_fast * x]
  return moments, sums(terms)


def _factored_rsqrt(acc: F.FactoredMoment, g):
  """1 / sqrt(Adafactor's V_hat) of one tensor from its accumulators."""
  return jax.lax.rsqrt(F.factored_second_moment(acc, g) + 1e-30)


def _runtime_one(count, k: int):
  """An int32 1 that XLA cannot prove to be 1 (counts are non-negative), a different
  expression for each ``k``."""
  return jnp.minimum(count, 0) * k + 1


# Blocks of more elements than this read their inputs on their own copy in each of the
# statistics and update passes (_on_own_copy); smaller ones share the features between
# the passes. Measured on the whole update, old and new programs interleaved in one
# process (2 shared cores): own copies everywhere made a 1e5-element flat block 1.34x
# slower (its intermediates stay in cache, and the statistics pass then computes every
# feature inside a row reduction, which XLA:CPU runs about 3x slower than the same
# arithmetic in an elementwise loop) and 3.3e5-element tensors (a 1e6-param MLP) 1.02x;
# 3.3e6-element tensors (1e7 params) 0.6-0.8x.
_OWN_COPY_MIN = 1 << 20


def _on_own_copy(inp: LeafInputs, one) -> LeafInputs:
  """``inp`` with every parameter-shaped buffer multiplied by ``one`` (a
  :func:`_runtime_one`, so bitwise the same values), Adafactor's 1 / sqrt(V_hat)
  rebuilt from the accumulators where the block holds them. A block of at most
  ``_OWN_COPY_MIN`` elements is returned as it is (its 1 / sqrt(V_hat) rebuilt).

  Why. The statistics pass and the update pass compute the same features from the same
  buffers; XLA merges the two computations (CSE) and then, as it does not duplicate an
  expensive producer (sqrt, division) into two consumers, writes every shared feature
  and candidate to memory and reads it back: about 15 extra parameter-sized buffers per
  step (352 bytes/param at 1e7 parameters, where the buffers leave the cache). Each pass
  reading its inputs through its own identity keeps its features in its own fusion. (An
  optimization barrier does not do this on XLA:CPU: it is removed before CSE.)
  """
  if inp.g.size <= _OWN_COPY_MIN:
    if isinstance(inp.rsqrt_fact, F.FactoredMoment):
      inp = inp._replace(rsqrt_fact=_factored_rsqrt(inp.rsqrt_fact, inp.g))
    return inp
  times_one = lambda a: None if a is None else a * one.astype(a.dtype)
  rsqrt = inp.rsqrt_fact
  if isinstance(rsqrt, F.FactoredMoment):
    rsqrt = _factored_rsqrt(jax.tree.map(times_one, rsqrt), inp.g)
  else:
    rsqrt = times_one(rsqrt)
  fields = ("g", "x", "m_fast", "m_mid_prev", "m_slow", "v", "tam_m", "laprop_m", "muon",
            "x0")
  return inp._replace(rsqrt_fact=rsqrt, **{f: times_one(getattr(inp, f)) for f in fields})


def _tam_laprop_pass(config: LOConfig, bc_v, damping, tam_m, laprop_m, g, v):
  """TAM's and LaProp's momenta of one block."""
  tam_m = F.update_tam_momentum(tam_m, g, config.tam_beta, damping, config.tam_eps)
  laprop_in = F.adam_direction(g, v * (1 / bc_v), config.laprop_eps)
  laprop_m = F.update_ema(updates=laprop_in, moments=laprop_m,
                          decay=config.laprop_b1)
  return tam_m, laprop_m


def _muon_pass(config: LOConfig, count, fan_in: int, with_ema: bool, mu, g):
  """Muon's momentum, direction and the direction's sum of squares for one hidden
  matrix (Jordan et al 2024): ``mu`` is this step's EMA, or with ``with_ema`` the
  previous one, advanced here (Muon's own buffer)."""
  if with_ema:
    mu = F.update_ema(updates=g, moments=mu, decay=config.muon_beta)
  m_hat = F.nesterov_momentum(mu, g, config.muon_beta, count)
  direction = _on_whole_matrix(lambda m: F.muon_direction(
      m, fan_in, config.muon_ns_steps, F.NEWTON_SCHULZ_COEFFS, config.muon_eps), m_hat)
  return mu, direction, jnp.sum(jnp.square(direction))


def _on_whole_matrix(fn, a):
  """``fn(a)`` for matrix math (Newton-Schulz) on ``a``, which an explicit mesh may
  shard: there ``a`` is gathered for ``fn`` and the result takes ``a``'s sharding back
  (under an Auto mesh the compiler chooses the collectives)."""
  if not _layout.explicitly_sharded(a):
    return fn(a)
  spec = jax.typeof(a).sharding.spec
  out = fn(jax.sharding.reshard(a, jax.sharding.PartitionSpec()))
  return jax.sharding.reshard(out, spec)


def _check_muon_fan_in(params: Tree, muon_fan_in: Tree | None) -> Tree:
  """``muon_fan_in`` checked against ``params``' shapes, as a tree of ints."""
  if muon_fan_in is None:
    raise ValueError("LOConfig.muon needs muon_fan_in=: per leaf the fan-in of the 2-D "
                     "view Muon orthogonalizes, 0 elsewhere (metaopt.optimizers."
                     "muon_fan_ins(params, roles)).")
  leaves = jax.tree.structure(params).flatten_up_to(muon_fan_in)
  for shape, f in zip((jnp.shape(p) for p in jax.tree.leaves(params)), leaves):
    if f and (len(shape) < 2 or math.prod(shape) % f):
      raise ValueError(f"muon_fan_in={f} does not give a 2-D view of a tensor of shape "
                       f"{shape}.")
  return jax.tree.unflatten(jax.tree.structure(params), [int(f) for f in leaves])


def _muon_tensors(fan_in: Tree | None) -> set[int]:
  """Indices (tree order) of the tensors Muon orthogonalizes: they keep their own
  buffers in the flat layout (Newton-Schulz needs each matrix)."""
  if fan_in is None:
    return set()
  return {i for i, f in enumerate(jax.tree.leaves(fan_in)) if f}


def _statistics_pass(config: LOConfig, ctx: StepContext, sums, inp: LeafInputs):
  """Every per-tensor sum the features need: each normalized feature's sum of squares
  (the cautious one before its renormalization), the cautious mask's count, then with
  ``config.step_size_features`` the :data:`_STEP_SIZE_SUMS`."""
  _, raw, bounded = _elementwise_features(config, ctx, inp)
  terms = [jnp.square(f) for f in raw] + bounded
  if config.step_size_features:
    disp = inp.x - inp.x0
    terms += [jnp.square(disp), jnp.square(inp.x0), -inp.m_fast * disp]
  return sums(terms, masked=True)


# The statistics pass's step-size sums: ||x - x_0||^2, ||x_0||^2, <m_fast, x_0 - x>.
_STEP_SIZE_SUMS = 3
# Per-parameter features: the rows of w1 before the per-tensor ones, and the statistics
# pass's sums before its step-size sums (one per feature: a sum of squares or a count).
_NUM_ELEMENTWISE = len(NORMALIZED_FEATURES) + len(BOUNDED_FEATURES)


def step_size_features(disp_sq, x0_sq, x_sq, m_dot_disp, m_sq, trend) -> jax.Array:
  """The :data:`metaopt.lopt._config.STEP_SIZE_FEATURES` of every tensor, ``[n, 3]``,
  from per-tensor sums (``[n]`` each: ||x - x_0||^2, ||x_0||^2, ||x||^2,
  <m_fast, x_0 - x>, ||m_fast||^2) and the global loss trend (a scalar).

  The engine's only implementation of their equations (see the module docstring).
  """
  log_distance = F.log_distance(F.distance_ratio_from_sums(disp_sq, x0_sq, x_sq))
  cosine = F.cosine_from_sums(m_dot_disp, m_sq, disp_sq, eps=1e-30)
  feats = jnp.stack([log_distance, cosine, jnp.broadcast_to(trend, cosine.shape)], axis=1)
  assert feats.shape[1] == len(STEP_SIZE_FEATURES)
  return feats


def _tensor_scalars(config: LOConfig, theta: dict, sums, sizes, tensor_features, time,
                    muon_sum_sq=None, trend=None) -> TensorScalars:
  """Per-tensor statistics of every tensor at once (rows: tensors).

  ``tensor_features``: the first per-tensor features (damping, Polyak ratio, has-loss),
  to which the two log-RMS features and the time features are appended, as in
  :data:`metaopt.lopt.FEATURE_NAMES`. ``muon_sum_sq``: the muon feature's sums of
  squares (0 where it is absent), with the switch on. ``trend``: the loss trend, with
  ``config.step_size_features`` (whose features follow, at their rows).
  """
  stats, step_size_sums = sums[:, :_NUM_ELEMENTWISE], sums[:, _NUM_ELEMENTWISE:]
  cautious_norm = 1 / jnp.maximum(stats[:, -1] / sizes, 1e-3)
  sum_sq = stats[:, :-1].at[:, _CAUTIOUS].multiply(jnp.square(cautious_norm))
  if muon_sum_sq is not None:
    sum_sq = jnp.concatenate([sum_sq, muon_sum_sq[:, None]], axis=1)
  inv_rms = jax.lax.rsqrt(sum_sq / sizes[:, None] + 1e-8)
  idx_x, idx_g = NORMALIZED_FEATURES.index("param"), NORMALIZED_FEATURES.index("grad")
  log_rms = [_log_rms(sum_sq[:, idx_x], sizes), _log_rms(sum_sq[:, idx_g], sizes)]
  scalars = [tensor_features, jnp.stack(log_rms, axis=1),
             jnp.broadcast_to(time, (sizes.shape[0], time.shape[0]))]
  rows = list(range(_NUM_ELEMENTWISE,
                    _NUM_ELEMENTWISE + len(TENSOR_FEATURES) + len(TIME_TAUS) + 2))
  if config.step_size_features:
    idx_m = NORMALIZED_FEATURES.index("momentum_fast")
    assert step_size_sums.shape[1] == _STEP_SIZE_SUMS
    disp_sq, x0_sq, m_dot_disp = step_size_sums.T
    scalars.append(step_size_features(disp_sq, x0_sq, sum_sq[:, idx_x], m_dot_disp,
                                      sum_sq[:, idx_m], trend))
    first = config.feature_names.index(STEP_SIZE_FEATURES[0])
    rows += list(range(first, first + len(STEP_SIZE_FEATURES)))
  scalars = jnp.concatenate(scalars, axis=1)
  return TensorScalars(cautious_norm, inv_rms, _network.hidden_bias(theta, scalars, rows))


def _tensor_update(config: LOConfig, theta: dict, ctx: StepContext, inp: LeafInputs,
                   scalars: TensorScalars):
  """The update of one tensor: features, MLP and classical mix in one elementwise pass."""
  dtype = inp.g.dtype
  cands, raw, bounded = _elementwise_features(config, ctx, inp)
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


def update(config: LOConfig, theta: dict, grads: Tree, state: LOState, params: Tree, *,
           value=None, num_steps=None, learning_rate=1.0, skip_nonfinite: bool = False,
           muon_fan_in: Tree | None = None):
  """One learned-optimizer step; returns (updates, new_state). Pure and jittable.

  ``muon_fan_in`` (needed with ``config.muon`` only; static Python ints): per leaf,
  the fan-in of the ``[fan_in, size / fan_in]`` view Muon orthogonalizes, 0 for the
  tensors it does not (:func:`metaopt.optimizers.muon_fan_ins`).

  With ``skip_nonfinite``, a step whose gradients (or ``value``) hold a NaN or inf gives
  zero updates, leaves the state bitwise unchanged and adds one to
  ``state.num_nonfinite`` (what ``optax.apply_if_finite`` does). The test reads the
  first pass's per-tensor sums, which any non-finite gradient entry makes non-finite
  (so does a gradient above ~1e19 in magnitude, whose square overflows float32), and
  the selection is applied where each buffer is produced: no extra pass.
  """
  if config.step_size_features != (state.initial_params is not None):
    raise ValueError(f"LOConfig.step_size_features={config.step_size_features} but the "
                     "state was made " + ("without" if config.step_size_features else
                                          "with") + " it: make it with init_state(params, "
                     "mup_scale, config) for this config.")
  treedef = jax.tree.structure(params)
  if not treedef.num_leaves:  # an empty partition (optax.masked, multi_transform)
    return params, state._replace(count=optax.safe_increment(state.count))
  flat = treedef.flatten_up_to
  sdt = [s.dtype for s in flat(state.mup_scale)]
  g = [gr.astype(dt) for gr, dt in zip(flat(grads), sdt)]
  x = [p.astype(dt) for p, dt in zip(flat(params), sdt)]
  count = optax.safe_increment(state.count)
  scalar_dt = state.loss_ema.dtype
  t = count.astype(scalar_dt)
  bc = lambda b: 1 - jnp.asarray(b, scalar_dt)**t
  bc_fast, bc_v = bc(config.momentum_decays[0]), bc(config.second_moment_decay)
  with_loss = value is not None
  # Tensors of one key are batched by one program (_map_grouped): under an explicit
  # mesh they must also share a sharding.
  keys = [(a.shape, a.dtype) + ((jax.typeof(a).sharding.spec,) if
                                _layout.explicitly_sharded(a) else ()) for a in g]
  fan_in = flat(_check_muon_fan_in(params, muon_fan_in)) if config.muon else None
  flat_layout = is_flat(state)
  blocks = _Blocks(keys, flat_layout, state.count,
                   _muon_tensors(fan_in))
  buffers = (lambda packed: [packed.flat, *packed.tensors]) if flat_layout else flat
  g_b, x_b = blocks.pack(g), blocks.pack(x)

  # Pass 1: moments and the raw sums of every tensor.
  first = lambda sums, *a: _first_pass(config, bc_v, with_loss, sums, *a)
  moments, sums1 = zip(*blocks.map(first, *(buffers(tree) for tree in (
      *state.momenta[:3], state.second_moment, state.tam_momentum)), g_b, x_b))
  sums1 = blocks.per_tensor(sums1, scalar_dt)
  if skip_nonfinite:  # keep(new, old): new on a finite step, old on a skipped one.
    finite = jnp.all(jnp.isfinite(sums1))
    if with_loss:
      finite &= jnp.all(jnp.isfinite(jnp.asarray(value)))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    skipped = (~finite).astype(state.num_nonfinite.dtype)
  else:
    keep = lambda new, old: new
    skipped = 0
  moments = [keep(m, Moments(*prev)) for m, *prev in zip(
      moments, *(buffers(tree) for tree in (*state.momenta[:3], state.second_moment)))]

  # Adafactor's accumulators, tensor by tensor (they need each matrix's rows/columns).
  decay = jnp.asarray(config.factored_decay, scalar_dt)
  factored_pass = lambda acc, gr: _factored_pass(decay, finite if skip_nonfinite else None,
                                                 acc, gr)
  factored, rsqrt_fact = zip(*(
      [factored_pass(*a) for a in zip(flat(state.factored), g)] if flat_layout else
      _map_grouped(factored_pass, keys, list(zip(flat(state.factored), g)))))

  # Cross-tensor scalars: TAM's damping per tensor, MoMo-Adam's global step.
  prev_torque = (state.torque_ema if flat_layout else
                 jnp.stack([a.astype(scalar_dt) for a in flat(state.torque_ema)]))
  torque = keep(F.update_torque_ema(prev_torque,
                                    F.torque_cosine_from_sums(*sums1[:, :_TORQUE_SUMS].T),
                                    config.tam_gamma), prev_torque)
  damping = F.tam_damping(torque)
  momo_cap = config.momo_alpha / bc_fast
  if with_loss:  # Schaipp et al, arXiv:2305.07583, Alg. 2.
    b_fast = config.momentum_decays[0]
    gp_sum, d_norm, d_dot_x = jnp.sum(sums1[:, _TORQUE_SUMS:], axis=0)
    loss_ema = F.update_ema(updates=jnp.asarray(value, scalar_dt),
                            moments=state.loss_ema, decay=b_fast)
    gp_ema = F.update_ema(updates=gp_sum, moments=state.grad_param_ema, decay=b_fast)
    momo_tau = F.momo_polyak_step(config.momo_alpha, loss_ema, gp_ema, d_dot_x, d_norm,
                                  lower_bound=bc_fast * config.momo_lower_bound,
                                  denom_eps=jnp.finfo(float).eps, max_step=momo_cap)
  else:
    loss_ema, gp_ema, momo_tau = state.loss_ema, state.grad_param_ema, momo_cap
  loss_slow, trend = state.loss_ema_slow, None
  if config.step_size_features:  # the loss trend: bias-corrected fast vs slow EMA.
    trend = jnp.zeros([], scalar_dt)
    if with_loss:
      loss_slow = F.update_ema(updates=jnp.asarray(value, scalar_dt),
                               moments=state.loss_ema_slow, decay=config.loss_trend_decay)
      trend = F.loss_trend(loss_ema / bc_fast, loss_slow / bc(config.loss_trend_decay))
  if config.horizon_decay == "linear" and num_steps is not None:
    learning_rate = learning_rate * jnp.clip(
        1 - (count.astype(jnp.float32) - 1) / num_steps, 1 / num_steps, 1.0)
  if config.warmup_fraction and num_steps is not None:  # linear warmup: t / W, W >= 1
    warmup = jnp.maximum(config.warmup_fraction * num_steps, 1.0)
    learning_rate = learning_rate * jnp.minimum(count.astype(jnp.float32) / warmup, 1.0)
  ctx = StepContext(bc_fast=bc_fast, bc_v=bc_v, bc_laprop=bc(config.laprop_b1),
                    momo_tau=momo_tau, learning_rate=jnp.asarray(learning_rate),
                    count=count)

  # Muon's direction on each hidden matrix (per matrix: Newton-Schulz matmuls).
  muon_dir, muon_sum_sq, muon_momenta = [None] * len(g), None, None
  if config.muon:
    own = config.muon_momentum == 3
    mu = flat(state.momenta[3]) if own else [
        getattr(moments[blocks.block_of(i)], Moments._fields[config.muon_momentum])
        if f else None for i, f in enumerate(fan_in)]
    muon_sum_sq, new_mu = [jnp.zeros([], scalar_dt)] * len(g), list(mu)
    for f in sorted({f for f in fan_in if f}):  # one program per (fan-in, shape, dtype)
      idx = [i for i, fi in enumerate(fan_in) if fi == f]
      muon = lambda m_i, g_i, f=f: _muon_pass(config, count, f, own, m_i, g_i)
      for i, (m_i, d_i, sq_i) in zip(idx, _map_grouped(muon, [keys[i] for i in idx],
                                                       [(mu[i], g[i]) for i in idx])):
        new_mu[i], muon_dir[i], muon_sum_sq[i] = m_i, d_i, sq_i
    muon_sum_sq = jnp.stack([a.astype(scalar_dt) for a in muon_sum_sq])
    if own:
      muon_momenta = keep(new_mu, flat(state.momenta[3]))

  # TAM and LaProp momenta.
  tam_laprop = lambda _, *a: _tam_laprop_pass(config, bc_v, *a)
  tam, laprop = zip(*blocks.map(tam_laprop, blocks.split(damping.astype(scalar_dt)),
                                buffers(state.tam_momentum),
                                buffers(state.laprop_momentum), g_b,
                                [m.v for m in moments]))
  tam = keep(list(tam), buffers(state.tam_momentum))
  laprop = keep(list(laprop), buffers(state.laprop_momentum))
  # Flat: one state dtype, the scales reach the flat buffer's rows like any per-tensor
  # value; per tensor: each tensor's own scalar in its own dtype.
  mup_scales = (blocks.split(jnp.stack(flat(state.mup_scale))) if flat_layout else
                flat(state.mup_scale))
  x0_b = (buffers(state.initial_params) if config.step_size_features else
          [None] * len(g_b))
  # Adafactor's 1 / sqrt(V_hat): packed once for the flat buffer; a tensor of its own
  # hands its accumulators on (each pass rebuilds it, see _on_own_copy).
  small = set(blocks.small)
  rsqrt_fact = blocks.pack([r if i in small else acc for i, (r, acc) in enumerate(
      zip(rsqrt_fact, factored))])
  inputs = [LeafInputs(g=gr, x=xx, m_fast=m.m_fast, m_mid_prev=mid, m_slow=m.m_slow, v=m.v,
                       tam_m=tm, laprop_m=lp, rsqrt_fact=rf, mup_scale=s, x0=x0)
            for gr, xx, m, mid, tm, lp, rf, s, x0 in zip(
                g_b, x_b, moments, buffers(state.momenta[1]), tam, laprop,
                rsqrt_fact, mup_scales, x0_b)]

  # Pass 2: the feature statistics of every tensor, then per-tensor scalars at once.
  # Passes 2 and 3 each read their inputs through their own identity (_on_own_copy).
  one2, one3 = _runtime_one(count, 2), _runtime_one(count, 3)
  statistics = lambda sums, inp: _statistics_pass(config, ctx, sums,
                                                  _on_own_copy(inp, one2))
  sums2 = blocks.per_tensor(blocks.map(statistics, inputs), scalar_dt)
  if config.muon:  # hidden matrices (with Muon's direction) are programs of their own
    inputs = [inp if i is None else inp._replace(muon=muon_dir[i])
              for inp, i in zip(inputs, blocks.tensor_of_blocks())]
    blocks.keys = [k + (d is not None,) for k, d in zip(blocks.keys, muon_dir)]
  time = jnp.concatenate([F.time_features(count, num_steps, TIME_TAUS),
                          jnp.float32([num_steps is not None])]).astype(scalar_dt)
  per_tensor = jnp.stack([damping, jnp.broadcast_to(momo_tau / momo_cap, damping.shape),
                          jnp.full(damping.shape, with_loss, scalar_dt)], axis=1)
  sizes = jnp.asarray([a.size for a in g], scalar_dt)
  scalars = _tensor_scalars(config, theta, sums2, sizes, per_tensor, time, muon_sum_sq,
                            trend)

  # Pass 3: the updates.
  third = lambda _, inp, row: _tensor_update(config, theta, ctx, _on_own_copy(inp, one3),
                                             row)
  updates = [keep(u, jnp.zeros_like(u))
             for u in blocks.map(third, inputs, blocks.split(scalars))]
  updates = [u.astype(jnp.result_type(p)) for u, p in zip(blocks.unpack(updates),
                                                          flat(params))]

  unflat = lambda leaves: jax.tree.unflatten(treedef, list(leaves))
  packed = lambda bs: _layout.Packed(bs[0], tuple(bs[1:]))
  assemble = (lambda bs: packed(list(bs))) if flat_layout else unflat
  loss_ema, gp_ema = keep((loss_ema, gp_ema), (state.loss_ema, state.grad_param_ema))
  loss_slow = keep(loss_slow, state.loss_ema_slow)
  new_state = LOState(
      count=keep(count, state.count),
      momenta=tuple(assemble(getattr(m, f) for m in moments)
                    for f in ("m_fast", "m_mid", "m_slow")) + (
                        () if muon_momenta is None else (unflat(muon_momenta),)),
      second_moment=assemble(m.v for m in moments),
      factored=unflat(factored),
      tam_momentum=assemble(tam),
      torque_ema=(torque if flat_layout else
                  unflat(torque[i].astype(d) for i, d in enumerate(sdt))),
      laprop_momentum=assemble(laprop),
      loss_ema=loss_ema, grad_param_ema=gp_ema, mup_scale=state.mup_scale,
      num_nonfinite=state.num_nonfinite + skipped,
      initial_params=state.initial_params, loss_ema_slow=loss_slow)
  return unflat(updates), new_state


# Tensors up to this many elements are stacked with the others of their shape and dtype
# and processed by one vmapped program; larger ones run alone. Stacking copies the
# inputs, which costs step time on large tensors, while compile time is per distinct
# program: measured on a 102-tensor Flax transformer (benchmarks/step_cost.py), 2^16
# keeps the step within 1.1x AdamW's and compiles about as fast as stacking everything.
_MAX_STACKED = 1 << 16


def _map_grouped(fn, keys: list, args: list) -> list:
  """``[fn(*a) for a in args]``, batching entries of one key (shape, dtype, ...) by vmap.

  Each group compiles once however many tensors it holds, so compile time grows with
  the number of distinct shapes, not of tensors.
  """
  groups: dict[Any, list[int]] = {}
  for i, key in enumerate(keys):
    groups.setdefault(key, []).append(i)
  out = [None] * len(args)
  for key, idx in groups.items():
    shape = key[0]
    if len(idx) == 1 or math.prod(shape) > _MAX_STACKED:
      for i in idx:
        out[i] = fn(*args[i])
      continue
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *[args[i] for i in idx])
    batched = jax.vmap(fn)(*stacked)
    for k, i in enumerate(idx):
      out[i] = jax.tree.map(lambda a, k=k: a[k], batched)
  return out
