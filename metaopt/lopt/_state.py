"""The learned optimizer's state: what it holds and how ``init`` lays it out.

The state holds six parameter-shaped buffers (three momenta, Adam's v, TAM's and
LaProp's momenta; with ``muon`` and a Muon decay none of the three has, a fourth
momentum on the matrices Muon orthogonalizes; with ``step_size_features`` a copy of the
initial parameters x_0), Adafactor's factored accumulators and scalars; never the
current parameters. Each buffer is a tree shaped like the params (per-tensor layout) or
a :class:`metaopt.lopt._layout.Packed` (flat layout).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from metaopt import features as F
from metaopt.lopt import _layout
from metaopt.lopt._config import LOConfig

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
    fan_in = check_muon_fan_in(params, muon_fan_in)
  layout = _flat_layout(params, dtypes, fan_in, flat)
  flat = layout is not None
  # Every state leaf its own array: a train step may donate them all.
  new_buffer = (lambda: layout.packed(jax.tree.leaves(zeros()), zeros=True)) if flat else zeros
  initial = None
  if config is not None and config.step_size_features:
    initial = jax.tree.map(lambda x: _copy_like(x, state_dtype(x)), params)
    if flat:
      initial = layout.packed(jax.tree.leaves(initial))
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


def _flat_layout(params: Tree, dtypes: list, fan_in: Tree | None, flat: bool | None
                 ) -> _InitLayout | None:
  """The flat layout of ``params``, or None where the per-tensor one applies."""
  leaves = jax.tree.leaves(params)
  can_flatten, sharding = _layout.flat_sharding(leaves, dtypes)
  small, large = _layout.partition([jnp.shape(a) for a in leaves], muon_tensors(fan_in))
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


def check_muon_fan_in(params: Tree, muon_fan_in: Tree | None) -> Tree:
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


def muon_tensors(fan_in: Tree | None) -> set[int]:
  """Indices (tree order) of the tensors Muon orthogonalizes: they keep their own
  buffers in the flat layout (Newton-Schulz needs each matrix)."""
  if fan_in is None:
    return set()
  return {i for i, f in enumerate(jax.tree.leaves(fan_in)) if f}
