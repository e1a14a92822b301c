"""The learned optimizer's state: what it holds and how ``init`` lays it out.

The state holds six parameter-shaped buffers (three momenta, Adam's v, TAM's and
LaProp's momenta), Adafactor's factored accumulators and scalars, then what the switches
turned on add (:mod:`metaopt.lopt._switches`: with ``muon`` and a Muon decay none of the
three has, a fourth momentum on the matrices Muon orthogonalizes; with
``step_size_features`` a copy of the initial parameters x_0 and a slow loss EMA); never
the current parameters. Each buffer is a tree shaped like the params (per-tensor layout)
or a :class:`metaopt.lopt._layout.Packed` (flat layout).
"""

from __future__ import annotations

import collections
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from metaopt import features as F
from metaopt.lopt import _layout
from metaopt.lopt._config import LOConfig
from metaopt.lopt._switches import SWITCHES, InitContext

Tree = Any

_CORE_FIELDS = (
    "count",  # int32 scalar: updates applied so far.
    "momenta",  # (fast, mid, slow) EMAs of g, each shaped like params (+ a switch's).
    "second_moment",  # EMA of g^2.
    "factored",  # Adafactor FactoredMoment per leaf.
    "tam_momentum",  # TAM's m_t = beta m + (eps + d_t) g.
    "torque_ema",  # TAM's smoothed cosine s_hat: one scalar per leaf ([num_tensors] flat).
    "laprop_momentum",  # EMA of g / (sqrt(v_hat) + eps).
    "loss_ema",  # MoMo's fbar (b1-EMA of the loss from zero).
    "grad_param_ema",  # MoMo's gamma (b1-EMA of <g, x> from zero).
    "mup_scale",  # base_fan_in / fan_in per hidden leaf, 1 elsewhere (scalars).
    "num_nonfinite",  # int32 scalar: steps skipped for non-finite grads or loss.
)
# Each switch's fields (metaopt.lopt._switches), in SWITCHES order: None with it off.
_SWITCH_FIELDS = tuple(name for s in SWITCHES for name in s.state_fields)
LOState = collections.namedtuple("LOState", _CORE_FIELDS + _SWITCH_FIELDS,
                                 defaults=(None,) * len(_SWITCH_FIELDS))
LOState.__doc__ = f"""State of the learned optimizer (arrays only; never the parameters).

Fields {_CORE_FIELDS}, then the switches' {_SWITCH_FIELDS} (None with a switch off;
see :mod:`metaopt.lopt._state` and :mod:`metaopt.lopt._switches`)."""


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


def switch_infos(config: LOConfig | None, params: Tree, statics: dict) -> dict:
  """Per switch turned on, its checked static per-leaf inputs (``Switch.prepare``)."""
  switches = () if config is None else config.switches_on
  return {s.name: s.prepare(config, params, statics) for s in switches}


def apart_tensors(config: LOConfig | None, infos: dict) -> set[int]:
  """Indices (tree order) of the tensors a switch needs in buffers of their own."""
  switches = () if config is None else config.switches_on
  return set().union(*(s.apart(config, infos[s.name]) for s in switches))


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
  cannot force the flat one where it does not apply). ``config`` is needed for the
  switches (:mod:`metaopt.lopt._switches`), each of which adds its buffers; ``muon_fan_in``
  (see :func:`metaopt.lopt._update.update`) only with ``config.muon``, whose matrices
  keep their own buffers.
  """
  leaves = jax.tree.leaves(params)
  dtypes = [state_dtype(x) for x in leaves]
  zeros = lambda: jax.tree.map(lambda x: _zeros_like(x, state_dtype(x)), params)
  infos = switch_infos(config, params, {"muon_fan_in": muon_fan_in})
  layout = _flat_layout(params, dtypes, apart_tensors(config, infos), flat)
  flat = layout is not None
  # Every state leaf its own array: a train step may donate them all.
  new_buffer = (lambda: layout.packed(jax.tree.leaves(zeros()), zeros=True)) if flat else zeros
  copy = lambda: jax.tree.map(lambda x: _copy_like(x, state_dtype(x)), params)
  copy_buffer = (lambda: layout.packed(jax.tree.leaves(copy()))) if flat else copy
  scalar_dtype = jnp.result_type(*dtypes or [jnp.float32])
  state = LOState(
      count=jnp.zeros([], jnp.int32),
      momenta=(new_buffer(), new_buffer(), new_buffer()),
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
  )
  init = InitContext(params, new_buffer, copy_buffer, zeros, scalar_dtype)
  for switch in (() if config is None else config.switches_on):
    state = switch.init_state(config, init, infos[switch.name], state)
  return state
class _InitLayout(NamedTuple):
  """Where ``init`` puts each tensor's buffer in the flat layout."""

  layout: _layout.FlatLayout
  small: list  # indices of the tensors in the flat buffer
  large: list  # indices of the tensors with buffers of their own
  dtype: Any
  sharding: Any

  def packed(self, leaves: list, zeros: bool = False) -> _layout.Packed:
    """A new Packed buffer: zeros, or ``leaves``' values (large ones as they are)."""
    flat = _layout.zeros(self.layout, self.dtype, self.sharding)
    if not zeros:
      flat = flat + _layout.pack(self.layout, [leaves[i] for i in self.small])
    return _layout.Packed(flat, tuple(leaves[i] for i in self.large))


def _flat_layout(params: Tree, dtypes: list, apart: set[int], flat: bool | None
                 ) -> _InitLayout | None:
  """The flat layout of ``params`` (``apart``: tensors that keep their own buffers), or
  None where the per-tensor one applies."""
  leaves = jax.tree.leaves(params)
  can_flatten, sharding = _layout.flat_sharding(leaves, dtypes)
  small, large = _layout.partition([jnp.shape(a) for a in leaves], apart)
  if not (can_flatten and flat is not False and small):
    return None
  layout = _layout.FlatLayout(tuple(jnp.shape(leaves[i]) for i in small))
  return _InitLayout(layout, small, large, dtypes[0], sharding)


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
