"""The engine: runs the learned optimizer's per-tensor rule over blocks of buffers.

The rule (:mod:`metaopt.lopt._rule`) is written for one tensor. The engine decides
where it runs and owns every workaround for the backend (XLA:CPU), each behind a named
helper of this module:

* :class:`Blocks`: the buffers a pass runs on. In the flat layout
  (:mod:`metaopt.lopt._layout`, unsharded trees) every tensor of up to
  ``_layout.MAX_FLAT`` elements lives in one ``[rows, 128]`` buffer: each pass runs once
  over it and its per-tensor sums are segment sums, so compile time does not grow with
  the number of tensors (XLA:CPU compiles each fused program separately). Larger
  tensors, and all tensors of a sharded tree, run each in its own shape, so a sharded
  parameter keeps its sharding and none is gathered; small ones of one shape, dtype
  (and explicit sharding) are batched by one vmapped program (:func:`map_grouped`).
* :func:`row_sums`: many sums in one variadic reduction, so XLA fuses their producers.
* :func:`runtime_one`, :func:`on_own_copy`: each of the statistics and update passes
  reads its inputs through its own runtime identity, so XLA does not merge their
  feature computations and write the shared features to memory.
* :func:`materialized`: a buffer XLA must write once before slicing it.
* :func:`on_whole_matrix`: matrix math on a tensor an explicit mesh shards.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metaopt import features as F
from metaopt.lopt import _layout

ROW = _layout.ROW  # row length of the variadic reduction over long vectors.

# Tensors up to this many elements are stacked with the others of their key and run by
# one vmapped program; larger ones run alone (stacking copies the inputs).
MAX_STACKED = 1 << 16

# Blocks of more elements than this read their inputs on their own copy in each of the
# statistics and update passes (on_own_copy); smaller ones share the features between
# the passes (their intermediates stay in cache).
OWN_COPY_MIN = 1 << 20


def runtime_zero(count: jax.Array) -> jax.Array:
  """An int32 0 that XLA cannot prove to be 0 (``count`` is non-negative)."""
  return jnp.minimum(count, 0).astype(jnp.int32)


def runtime_one(count: jax.Array, k: int) -> jax.Array:
  """An int32 1 that XLA cannot prove to be 1, a different expression for each ``k``
  (counts are non-negative)."""
  return jnp.minimum(count, 0) * k + 1


def on_own_copy(inputs, one, fields, rebuild):
  """``inputs`` (a NamedTuple of one block's buffers) with its ``fields`` multiplied
  by ``one`` (a :func:`runtime_one`: bitwise the same values) when the block holds
  more than :data:`OWN_COPY_MIN` elements; ``rebuild(inputs)`` then recomputes what
  the rule derives from accumulators (Adafactor's 1 / sqrt(V_hat)).

  Why. The statistics pass and the update pass compute the same features from the same
  buffers; XLA merges the two computations (CSE) and then, as it does not duplicate an
  expensive producer (sqrt, division) into two consumers, writes every shared feature
  to memory and reads it back: about 15 extra parameter-sized buffers per step. Each
  pass reading its inputs through its own identity keeps its features in its own
  fusion. (An optimization barrier does not do this on XLA:CPU: it is removed before
  CSE.)
  """
  if inputs.g.size <= OWN_COPY_MIN:
    return rebuild(inputs)
  times_one = lambda a: jax.tree.map(lambda b: b * one.astype(b.dtype), a)
  return rebuild(inputs._replace(**{f: times_one(getattr(inputs, f)) for f in fields}))


def materialized(buffer: jax.Array) -> jax.Array:
  """``buffer``, written to memory once before its consumers read slices of it.

  XLA fuses cheap producers into every consumer, so the computation that produces the
  flat update buffer -- the whole MLP -- would be compiled again into each tensor's
  slice. An optimization barrier does not stop this on XLA:CPU, and a division by a
  scalar is rewritten into a multiplication; a division by an array is expensive in
  XLA's cost model and never duplicated, so the buffer is divided by
  ``buffer * 0 + 1``: exactly 1 for a finite entry (non-finite updates become NaN;
  the non-finite skipping runs before this).
  """
  one = buffer * 0 + 1  # XLA does not fold x * 0 (NaN semantics).
  return buffer / one


def on_whole_matrix(fn, a):
  """``fn(a)`` for matrix math (Newton-Schulz) on ``a``, which an explicit mesh may
  shard: there ``a`` is gathered for ``fn`` and the result takes ``a``'s sharding back
  (under an Auto mesh the compiler chooses the collectives)."""
  if not _layout.explicitly_sharded(a):
    return fn(a)
  spec = jax.typeof(a).sharding.spec
  out = fn(jax.sharding.reshard(a, jax.sharding.PartitionSpec()))
  return jax.sharding.reshard(out, spec)


def row_sums(arrays: list) -> tuple:
  """Sums over the last axis of each array (all of one shape), in one pass.

  One variadic ``lax.reduce`` over all operands: one loop over the buffer into which
  XLA fuses the elementwise producers (separate ``jnp.sum`` calls each become their own
  reduction on XLA:CPU and force every operand to be written to memory first). That
  loop accumulates sequentially, so it only runs along rows.
  """
  zeros = tuple(jnp.zeros([], a.dtype) for a in arrays)
  add = lambda acc, x: tuple(u + w for u, w in zip(acc, x))
  return jax.lax.reduce(tuple(arrays), zeros, add, (arrays[0].ndim - 1,))


def sum_all(arrays: list) -> list:
  """The sum of every element of each array (all of one shape), in one pass.

  Row sums (:func:`row_sums`), then the row sums added by ``jnp.sum``, keeping float32
  error at the level of a plain sum. Short vectors and scalars use ``jnp.sum``
  directly; long vectors are reshaped to rows (not across an explicitly sharded axis).
  """
  if _layout.explicitly_sharded(arrays[0]):
    if arrays[0].ndim < 2:
      return [jnp.sum(a) for a in arrays]
    return [jnp.sum(r) for r in row_sums(arrays)]
  if arrays[0].ndim < 2:
    size = arrays[0].size
    if size < 2 * ROW or size % ROW:
      return list(jnp.sum(jnp.stack(arrays).reshape(len(arrays), -1), axis=1))
    arrays = [a.reshape(-1, ROW) for a in arrays]
  stacked = jnp.stack([r.reshape(-1) for r in row_sums(arrays)])
  return list(jnp.sum(stacked, axis=1))


def group_key(a: jax.Array) -> tuple:
  """What tensors batched by one program share: shape, dtype and, under an explicit
  mesh, sharding."""
  sharded = _layout.explicitly_sharded(a)
  return (a.shape, a.dtype) + ((jax.typeof(a).sharding.spec,) if sharded else ())


def map_grouped(fn, keys: list, args: list) -> list:
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
    if len(idx) == 1 or math.prod(shape) > MAX_STACKED:
      for i in idx:
        out[i] = fn(*args[i])
      continue
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *[args[i] for i in idx])
    batched = jax.vmap(fn)(*stacked)
    for k, i in enumerate(idx):
      out[i] = jax.tree.map(lambda a, k=k: a[k], batched)
  return out


class Blocks:
  """The buffers the passes run on: small tensors in one flat buffer, the others alone.

  Per tensor (sharded trees, and tensors above ``_layout.MAX_FLAT`` elements): a pass
  runs on each tensor in its own shape and its sums are that tensor's. Flat: a pass runs
  once over the flat buffer and its sums are segment sums, one row per tensor. Either
  way the driver sees per-tensor sums as ``[num_tensors, k]`` (tensor order) and hands
  per-tensor values back through :meth:`split`. Block order: the flat block (when there
  is one), then the other tensors in tree order.
  """

  def __init__(self, keys: list, flat: bool, count: jax.Array, apart: set = frozenset()):
    self.keys = keys
    small, large = (_layout.partition([k[0] for k in keys], apart) if flat else
                    ([], list(range(len(keys)))))
    self.small, self.large = small, large
    self.layout = _layout.FlatLayout(tuple(keys[i][0] for i in small)) if small else None
    self.ids = None if self.layout is None else _layout.row_tensor_ids(
        self.layout, runtime_zero(count))
    self.order = np.argsort(np.asarray(small + large, np.int64))  # blocks -> tensor order

  def tensor_of_blocks(self) -> list:
    """Per block: its tensor's index (tree order), None for the flat block."""
    return ([None] if self.layout is not None else []) + list(self.large)

  def block_of(self, i: int) -> int:
    """The block of tensor ``i``, which keeps its own buffer."""
    return self.tensor_of_blocks().index(i)

  def _flat_sums(self, terms: list, masked: bool) -> jax.Array:
    if masked:
      valid = _layout.valid_mask(self.layout, self.ids)
      terms = [jnp.where(valid, t, jnp.zeros([], t.dtype)) for t in terms]
    return _layout.segment_sums(self.layout, self.ids, jnp.stack(row_sums(terms)))

  def map(self, fn, *args: list) -> list:
    """``fn(*block_args)`` over the blocks; ``args`` are per-block lists."""
    out = []
    rest = list(zip(*args))
    if self.layout is not None:
      out.append(fn(*rest[0]))
      rest = rest[1:]
    return out + map_grouped(fn, [self.keys[i] for i in self.large], rest)

  def map_summed(self, fn, *args: list, dtype, masked: bool = False):
    """(outputs, ``[num_tensors, k]`` sums) of ``fn(*block_args) -> (output, terms)``
    over the blocks: each tensor's sums of its ``k`` terms (``masked``: the flat
    buffer's padding left out), in the same pass as the outputs."""
    def per_tensor(*a):
      out, terms = fn(*a)
      return out, jnp.stack(sum_all(terms))
    out, sums = [], []
    rest = list(zip(*args))
    if self.layout is not None:
      flat_out, terms = fn(*rest[0])
      out.append(flat_out)
      sums.append(self._flat_sums(terms, masked).astype(dtype))
      rest = rest[1:]
    for o, s in map_grouped(per_tensor, [self.keys[i] for i in self.large], rest):
      out.append(o)
      sums.append(s[None].astype(dtype))
    return out, jnp.concatenate(sums)[self.order]

  def split(self, per_tensor) -> list:
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
    """Inverse of :meth:`pack`: tensors in tree order (the flat buffer
    :func:`materialized` first)."""
    leaves = []
    if self.layout is not None:
      leaves = _layout.unpack(self.layout, materialized(blocks[0]))
      blocks = blocks[1:]
    leaves += list(blocks)
    return [leaves[j] for j in self.order]


def factored_rsqrt(acc: F.FactoredMoment, g):
  """1 / sqrt(Adafactor's V_hat) of one tensor from its accumulators."""
  return jax.lax.rsqrt(F.factored_second_moment(acc, g) + 1e-30)
