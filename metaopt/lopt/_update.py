"""The learned optimizer's step: named stages over the per-tensor rule.

One step, for every tensor (leaf) W with gradient g and parameter x:

1. :func:`_advance_moments`: momentum EMAs at three decays and Adam's second moment
   v, with the raw per-tensor sums (TAM's torque cosine, MoMo's inner products);
   Adafactor's row/column accumulators (:func:`_advance_factored`).
2. :func:`_cross_tensor_scalars`: TAM's damping per tensor, MoMo-Adam's global step,
   the learning rate with its horizon decay and warmup. Then each switch turned on
   advances (:func:`_advance_switches`; Muon's direction per hidden matrix, the loss
   trend, ...).
3. :func:`_advance_tam_laprop`: TAM's and LaProp's momenta (they need the damping).
4. :func:`_statistics`: every feature's per-tensor statistic in one pass, then the
   per-tensor scalars of all tensors at once (:func:`metaopt.lopt._rule.tensor_scalars`).
5. :func:`_updates`: features, MLP and the classical mix in one elementwise pass
   (:func:`metaopt.lopt._rule.tensor_update`).

The rule for one tensor (candidates, features, MLP, update, each equation with its
paper) is :mod:`metaopt.lopt._rule`; where each pass runs (flat or per-tensor layout,
batched programs) and every backend workaround are :mod:`metaopt.lopt._engine`'s; the
state and its layouts are :mod:`metaopt.lopt._state`'s. Each optional feature is a
switch (:mod:`metaopt.lopt._switches`): the stages call its hooks for every switch
turned on and never name one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metaopt import features as F
from metaopt.lopt import _engine
from metaopt.lopt import _layout
from metaopt.lopt import _rule
from metaopt.lopt._config import TIME_TAUS, LOConfig
from metaopt.lopt._rule import LeafInputs, Moments, StepContext
from metaopt.lopt._state import LOState, apart_tensors, init_state, is_flat, switch_infos
from metaopt.lopt._state import parameter_shapes, state_dtype  # pylint: disable=unused-import
from metaopt.lopt._switches import SWITCHES, SwitchStep
from metaopt.lopt._switches.step_size import step_size_features  # pylint: disable=unused-import

Tree = Any


@dataclasses.dataclass
class _Step:
  """What every stage of one step reads: the tensors in state dtype and their blocks."""

  config: LOConfig
  treedef: Any
  g: list  # gradients, tree order, in their state dtype
  x: list  # parameters, likewise
  count: jax.Array  # t, the 1-based step
  scalar_dtype: Any
  with_loss: bool
  blocks: _engine.Blocks
  infos: dict  # per switch turned on, its checked static inputs (Switch.prepare)
  value: Any  # the loss, or None
  keep: Callable = lambda new, old: new  # new on a finite step, old on a skipped one
  finite: Any = None  # with skip_nonfinite: whether this step's inputs are finite

  def leaves(self, tree) -> list:
    return self.treedef.flatten_up_to(tree)

  def buffers(self, buffer) -> list:
    """A parameter-shaped state buffer as one entry per block."""
    if isinstance(buffer, _layout.Packed):
      return [buffer.flat, *buffer.tensors]
    return self.leaves(buffer)

  def bias_correction(self, decay) -> jax.Array:
    """1 - decay^t."""
    return 1 - jnp.asarray(decay, self.scalar_dtype)**self.count.astype(self.scalar_dtype)


def _start(config, state: LOState, grads, params, value, muon_fan_in) -> _Step:
  treedef = jax.tree.structure(params)
  dtypes = [s.dtype for s in treedef.flatten_up_to(state.mup_scale)]
  g = [a.astype(dt) for a, dt in zip(treedef.flatten_up_to(grads), dtypes)]
  x = [p.astype(dt) for p, dt in zip(treedef.flatten_up_to(params), dtypes)]
  infos = switch_infos(config, params, {"muon_fan_in": muon_fan_in})
  blocks = _engine.Blocks([_engine.group_key(a) for a in g], is_flat(state), state.count,
                          apart_tensors(config, infos))
  return _Step(config, treedef, g, x, optax.safe_increment(state.count),
               state.loss_ema.dtype, value is not None, blocks, infos, value)


def _advance_moments(step: _Step, state: LOState, value, skip_nonfinite: bool):
  """Stage 1: the moments of every block and the raw per-tensor sums; sets
  ``step.keep`` (the non-finite test reads these sums, which any non-finite gradient
  entry makes non-finite)."""
  config, blocks = step.config, step.blocks
  bc_v = step.bias_correction(config.second_moment_decay)
  prev = [Moments(*b) for b in zip(*(step.buffers(tree) for tree in (
      *state.momenta[:3], state.second_moment)))]
  moments, raw_sums = blocks.map_summed(
      lambda p, tam_m, g, x: _rule.advance_moments(config, bc_v, step.with_loss, p, tam_m,
                                                   g, x),
      prev, step.buffers(state.tam_momentum), blocks.pack(step.g), blocks.pack(step.x),
      dtype=step.scalar_dtype)
  if skip_nonfinite:
    finite = jnp.all(jnp.isfinite(raw_sums))
    if step.with_loss:
      finite &= jnp.all(jnp.isfinite(jnp.asarray(value)))
    step.finite = finite
    step.keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  moments = [step.keep(m, p) for m, p in zip(moments, prev)]
  return moments, raw_sums


def _advance_factored(step: _Step, state: LOState):
  """Adafactor's accumulators and 1 / sqrt(V_hat), tensor by tensor (they need each
  matrix's rows and columns)."""
  decay = jnp.asarray(step.config.factored_decay, step.scalar_dtype)
  advance = lambda acc, g: _rule.advance_factored(decay, step.finite, acc, g)
  args = list(zip(step.leaves(state.factored), step.g))
  if step.blocks.layout is not None:
    return zip(*[advance(*a) for a in args])
  return zip(*_engine.map_grouped(advance, step.blocks.keys, args))


class _CrossTensor(NamedTuple):
  """Stage 2's scalars: per tensor (``[num_tensors]``) or global."""

  torque: jax.Array  # TAM's smoothed torque cosine, per tensor
  damping: jax.Array  # TAM's damping, per tensor
  momo_cap: jax.Array  # MoMo-Adam's step cap alpha / (1 - b_fast^t)
  loss_ema: jax.Array
  grad_param_ema: jax.Array


def _cross_tensor_scalars(step: _Step, state: LOState, raw_sums, value, num_steps,
                          learning_rate) -> tuple[_CrossTensor, StepContext]:
  """Stage 2: what couples the tensors (TAM's damping, MoMo-Adam's global step) and the
  step's learning rate."""
  config, dtype = step.config, step.scalar_dtype
  bc_fast = step.bias_correction(config.momentum_decays[0])
  prev_torque = (state.torque_ema if is_flat(state) else
                 jnp.stack([a.astype(dtype) for a in step.leaves(state.torque_ema)]))
  cosine = F.torque_cosine_from_sums(*raw_sums[:, :_rule.TORQUE_SUMS].T)
  torque = step.keep(F.update_torque_ema(prev_torque, cosine, config.tam_gamma),
                     prev_torque)
  damping = F.tam_damping(torque)
  momo_cap = config.momo_alpha / bc_fast
  loss_ema, gp_ema, momo_tau = state.loss_ema, state.grad_param_ema, momo_cap
  if step.with_loss:  # MoMo (Schaipp et al, arXiv:2305.07583, Alg. 2)
    b_fast = config.momentum_decays[0]
    gp_sum, d_norm, d_dot_x = jnp.sum(raw_sums[:, _rule.TORQUE_SUMS:], axis=0)
    loss_ema = F.update_ema(updates=jnp.asarray(value, dtype), moments=state.loss_ema,
                            decay=b_fast)
    gp_ema = F.update_ema(updates=gp_sum, moments=state.grad_param_ema, decay=b_fast)
    momo_tau = F.momo_polyak_step(config.momo_alpha, loss_ema, gp_ema, d_dot_x, d_norm,
                                  lower_bound=bc_fast * config.momo_lower_bound,
                                  denom_eps=jnp.finfo(float).eps, max_step=momo_cap)
  ctx = StepContext(bc_fast=bc_fast, bc_v=step.bias_correction(config.second_moment_decay),
                    bc_laprop=step.bias_correction(config.laprop_b1), momo_tau=momo_tau,
                    learning_rate=jnp.asarray(_scheduled_learning_rate(
                        config, step.count, num_steps, learning_rate)),
                    count=step.count)
  return _CrossTensor(torque, damping, momo_cap, loss_ema, gp_ema), ctx


def _scheduled_learning_rate(config: LOConfig, count, num_steps, learning_rate):
  """The user's learning rate times the horizon decay and warmup at 1-based step t.

  ``horizon_decay="linear"``: max(1 - (t - 1) / num_steps, 1 / num_steps) (past the
  horizon the last scheduled step size holds); ``"warmup_cosine"``:
  :func:`warmup_cosine_multiplier` (its warmup is ``warmup_fraction``'s). Otherwise
  ``warmup_fraction = w > 0`` multiplies by min(1, t / max(w num_steps, 1)). All only
  when ``num_steps`` is given.
  """
  if config.horizon_decay == "linear" and num_steps is not None:
    learning_rate = learning_rate * jnp.clip(
        1 - (count.astype(jnp.float32) - 1) / num_steps, 1 / num_steps, 1.0)
  if config.horizon_decay == "warmup_cosine" and num_steps is not None:
    learning_rate = learning_rate * warmup_cosine_multiplier(
        count, num_steps, config.warmup_fraction)
  elif config.warmup_fraction and num_steps is not None:  # linear warmup: t / W, W >= 1
    warmup = jnp.maximum(config.warmup_fraction * num_steps, 1.0)
    learning_rate = learning_rate * jnp.minimum(count.astype(jnp.float32) / warmup, 1.0)
  return learning_rate


def warmup_cosine_multiplier(count: jax.Array, num_steps, warmup_fraction: float
                             ) -> jax.Array:
  r"""The step-size multiplier of ``horizon_decay="warmup_cosine"`` at step ``count``.

  Exactly ``optax.warmup_cosine_decay_schedule(0, 1, W, N, 0)`` evaluated at the
  0-based step ``c = count - 1`` (the schedule an optax user gives Muon or AdamW;
  :func:`metaopt.eval.sweep.schedule_shape`), with ``N = num_steps`` and
  ``W = max(1, round(warmup_fraction * N))``:

  .. math::
    m(c) = c / W \; (c < W), \qquad
    m(c) = \tfrac12 \bigl(1 + \cos(\pi \min(c - W, N - W) / (N - W))\bigr)
    \; (c \ge W).

  ``N <= W`` (``N = 1``, where optax's schedule is undefined) gives 1: one full step.
  Past the horizon (``c >= N``) it holds the last step's value ``m(N - 1)`` instead of
  optax's 0, so training past ``num_steps`` goes on slowly rather than freezing (as
  with ``"linear"``). Computed in the default float dtype (float64 under x64: the
  parity tests against optax are exact to float64 rounding).
  """
  dtype = jnp.result_type(float)
  n = jnp.asarray(num_steps, dtype)
  if isinstance(num_steps, int):  # W as the schedule computes it, in Python floats
    warmup = jnp.asarray(max(1, int(round(warmup_fraction * num_steps))), dtype)
  else:  # traced (inject_hyperparams)
    warmup = jnp.maximum(jnp.round(warmup_fraction * n), 1.0)
  c = jnp.minimum(count.astype(dtype) - 1, n - 1)
  decay_steps = jnp.maximum(n - warmup, 1.0)
  cosine = 0.5 * (1 + jnp.cos(jnp.pi * jnp.clip(c - warmup, 0, decay_steps) / decay_steps))
  # num_steps <= W (num_steps = 1: optax's schedule is undefined there): one full step.
  return jnp.where(n <= warmup, 1.0, jnp.where(c < warmup, c / warmup, cosine))


def _advance_switches(step: _Step, state: LOState, moments: list, cross: _CrossTensor
                      ) -> dict[str, SwitchStep]:
  """Per switch turned on, what it computes after stage 2 (``Switch.advance``)."""
  config = step.config
  return {s.name: s.advance(config, step, state, step.infos[s.name], moments, cross)
          for s in config.switches_on}


def _with_tensor_inputs(step: _Step, inputs: list, switch_steps: dict) -> list:
  """``inputs`` with the switches' per-tensor inputs to the update pass (Muon's
  direction); the tensors that have one become programs of their own."""
  late = [(name, ss.tensor_inputs) for name, ss in switch_steps.items()
          if ss.tensor_inputs is not None]
  if not late:
    return inputs
  assert all(t[i] is None for _, t in late for i in step.blocks.small), (
      "a switch's per-tensor input on a tensor of the flat buffer: list it in Switch.apart")
  inputs = [inp if i is None else inp._replace(extra={**inp.extra,
                                                      **{n: t[i] for n, t in late}})
            for inp, i in zip(inputs, step.blocks.tensor_of_blocks())]
  step.blocks.keys = [k + tuple(t[i] is not None for _, t in late)
                      for i, k in enumerate(step.blocks.keys)]
  return inputs


def _advance_tam_laprop(step: _Step, state: LOState, damping, moments: list):
  """Stage 3: TAM's and LaProp's momenta of every block."""
  bc_v = step.bias_correction(step.config.second_moment_decay)
  tam, laprop = zip(*step.blocks.map(
      lambda *a: _rule.advance_tam_laprop(step.config, bc_v, *a),
      step.blocks.split(damping.astype(step.scalar_dtype)),
      step.buffers(state.tam_momentum), step.buffers(state.laprop_momentum),
      step.blocks.pack(step.g), [m.v for m in moments]))
  return (step.keep(list(tam), step.buffers(state.tam_momentum)),
          step.keep(list(laprop), step.buffers(state.laprop_momentum)))


def _leaf_inputs(step: _Step, state: LOState, moments, tam, laprop, factored, rsqrt_fact,
                 switch_steps: dict) -> list[LeafInputs]:
  """Per block, what the features read."""
  blocks = step.blocks
  # Flat: one state dtype, the scales reach the flat buffer's rows like any per-tensor
  # value; per tensor: each tensor's own scalar in its own dtype.
  mup_scales = (blocks.split(jnp.stack(step.leaves(state.mup_scale))) if is_flat(state)
                else step.leaves(state.mup_scale))
  extra = [{name: ss.block_inputs[b] for name, ss in switch_steps.items()
            if ss.block_inputs is not None} for b in range(len(moments))]
  # Adafactor's 1 / sqrt(V_hat): packed once for the flat buffer; a tensor of its own
  # hands its accumulators on (each pass rebuilds it: _rule.with_rsqrt_fact).
  small = set(blocks.small)
  rsqrt_fact = blocks.pack([r if i in small else acc for i, (r, acc) in enumerate(
      zip(rsqrt_fact, factored))])
  return [LeafInputs(g=g, x=x, m_fast=m.m_fast, m_mid_prev=mid, m_slow=m.m_slow, v=m.v,
                     tam_m=t, laprop_m=lp, rsqrt_fact=rf, mup_scale=s, extra=e)
          for g, x, m, mid, t, lp, rf, s, e in zip(
              blocks.pack(step.g), blocks.pack(step.x), moments,
              step.buffers(state.momenta[1]), tam, laprop, rsqrt_fact, mup_scales, extra)]


def _own_copy(step: _Step, k: int):
  """Each pass's reading of its inputs (:func:`metaopt.lopt._engine.on_own_copy`)."""
  one = _engine.runtime_one(step.count, k)
  return lambda inp: _engine.on_own_copy(inp, one, _rule.BUFFER_FIELDS,
                                         _rule.with_rsqrt_fact)


def _statistics(step: _Step, theta, ctx: StepContext, cross: _CrossTensor, inputs,
                switch_steps: dict, num_steps) -> _rule.TensorScalars:
  """Stage 4: every feature's per-tensor statistic, then the per-tensor scalars."""
  config, dtype = step.config, step.scalar_dtype
  read = _own_copy(step, 2)
  _, sums = step.blocks.map_summed(
      lambda inp: _rule.feature_statistics(config, ctx, read(inp)), inputs, dtype=dtype,
      masked=True)
  time = jnp.concatenate([F.time_features(step.count, num_steps, TIME_TAUS),
                          jnp.float32([num_steps is not None])]).astype(dtype)
  damping = cross.damping
  per_tensor = jnp.stack([damping,
                          jnp.broadcast_to(ctx.momo_tau / cross.momo_cap, damping.shape),
                          jnp.full(damping.shape, step.with_loss, dtype)], axis=1)
  sizes = jnp.asarray([a.size for a in step.g], dtype)
  return _rule.tensor_scalars(config, theta, sums, sizes, per_tensor, time, switch_steps)


def _updates(step: _Step, theta, ctx: StepContext, inputs, scalars, params) -> list:
  """Stage 5: every tensor's update, in tree order and the parameters' dtypes."""
  read = _own_copy(step, 3)
  updates = step.blocks.map(
      lambda inp, row: _rule.tensor_update(step.config, theta, ctx, read(inp), row),
      inputs, step.blocks.split(scalars))
  updates = [step.keep(u, jnp.zeros_like(u)) for u in updates]
  return [u.astype(jnp.result_type(p)) for u, p in zip(step.blocks.unpack(updates),
                                                       step.leaves(params))]


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
  first stage's per-tensor sums, which any non-finite gradient entry makes non-finite
  (so does a gradient above ~1e19 in magnitude, whose square overflows float32), and
  the selection is applied where each buffer is produced: no extra pass.
  """
  _check_state_fields(config, state)
  if not jax.tree.structure(params).num_leaves:  # an empty partition (optax.masked, ...)
    return params, state._replace(count=optax.safe_increment(state.count))
  step = _start(config, state, grads, params, value, muon_fan_in)
  moments, raw_sums = _advance_moments(step, state, value, skip_nonfinite)
  factored, rsqrt_fact = _advance_factored(step, state)
  cross, ctx = _cross_tensor_scalars(step, state, raw_sums, value, num_steps,
                                     learning_rate)
  switch_steps = _advance_switches(step, state, moments, cross)
  tam, laprop = _advance_tam_laprop(step, state, cross.damping, moments)
  inputs = _leaf_inputs(step, state, moments, tam, laprop, factored, rsqrt_fact,
                        switch_steps)
  scalars = _statistics(step, theta, ctx, cross, inputs, switch_steps, num_steps)
  inputs = _with_tensor_inputs(step, inputs, switch_steps)
  updates = _updates(step, theta, ctx, inputs, scalars, params)
  new_state = _new_state(step, state, moments, factored, tam, laprop, cross, skip_nonfinite)
  for switch_step in switch_steps.values():
    new_state = switch_step.update_state(new_state)
  return jax.tree.unflatten(step.treedef, updates), new_state


def _check_state_fields(config: LOConfig, state: LOState) -> None:
  """A switch with state fields is on exactly when the state holds them."""
  for switch in (s for s in SWITCHES if s.state_fields):
    on = getattr(config, switch.name)
    if on != (getattr(state, switch.state_fields[0]) is not None):
      raise ValueError(f"LOConfig.{switch.name}={on} but the state was made " +
                       ("without" if on else "with") + " it: make it with init_state("
                       "params, mup_scale, config) for this config.")


def _new_state(step: _Step, state: LOState, moments, factored, tam, laprop,
               cross: _CrossTensor, skip_nonfinite: bool) -> LOState:
  """The core's fields of the new state (the switches' carried over: each switch then
  advances its own, :attr:`metaopt.lopt._switches.SwitchStep.update_state`)."""
  keep, flat = step.keep, is_flat(state)
  unflat = lambda leaves: jax.tree.unflatten(step.treedef, list(leaves))
  assemble = (lambda bs: _layout.Packed(bs[0], tuple(bs[1:]))) if flat else unflat
  buffer = lambda field: assemble([getattr(m, field) for m in moments])
  loss_ema, gp_ema = keep((cross.loss_ema, cross.grad_param_ema),
                          (state.loss_ema, state.grad_param_ema))
  skipped = (~step.finite).astype(state.num_nonfinite.dtype) if skip_nonfinite else 0
  dtypes = [s.dtype for s in step.leaves(state.mup_scale)]
  return state._replace(
      count=keep(step.count, state.count),
      momenta=tuple(buffer(f) for f in ("m_fast", "m_mid", "m_slow")),
      second_moment=buffer("v"),
      factored=unflat(factored),
      tam_momentum=assemble(list(tam)),
      torque_ema=(cross.torque if flat else
                  unflat(cross.torque[i].astype(d) for i, d in enumerate(dtypes))),
      laprop_momentum=assemble(list(laprop)),
      loss_ema=loss_ema, grad_param_ema=gp_ema, mup_scale=state.mup_scale,
      num_nonfinite=state.num_nonfinite + skipped)
