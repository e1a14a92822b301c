"""The flat layout: every tensor of an unsharded tree in one ``[rows, ROW]`` buffer.

Why. XLA:CPU compiles every fused computation of a program on its own, and the
learned optimizer's passes give about 18 of them per tensor, each large (the features
and the MLP), so per-tensor passes compile in time proportional to the number of
tensors (measurements: ``benchmarks/README.md``). In the flat layout the passes run
once, over one buffer that holds every tensor, and the per-tensor statistics are
segment sums over its rows. Only Adafactor's factored accumulators, which need each
matrix's rows and columns, stay per tensor (a reduction and an outer product, as cheap
to compile as Adam's update).

How. Tensor ``i`` (``sizes[i]`` elements, flattened in row-major order) occupies
``rows[i] = ceil(sizes[i] / ROW)`` consecutive rows, zero-padded at the end. Padding
stays zero in every moment buffer (their updates map zeros to zeros); the statistics
mask it out (:func:`valid_mask`).

Sharded trees keep one buffer per tensor (the engine's other layout): concatenating
tensors sharded differently would gather them. Hand-written: no JAX library provides a
packed layout with segment statistics (``jax.flatten_util.ravel_pytree`` concatenates
but neither pads to rows nor keeps the per-tensor boundaries).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

ROW = 128  # elements per row: the vector width the row reductions run along.

# Tensors up to this many elements go into the flat buffer; larger ones keep their own
# buffers: the flat buffer's intermediates (XLA materializes several per pass) stay in
# cache only while the tensors are small (benchmarks/README.md).
MAX_FLAT = 1 << 18


class Packed(NamedTuple):
  """A parameter-shaped state buffer in the flat layout: the flat buffer of the small
  tensors, then the large tensors' own buffers (tree order)."""

  flat: jax.Array
  tensors: tuple


def partition(shapes: Sequence[tuple[int, ...]], apart=frozenset()
              ) -> tuple[list[int], list[int]]:
  """(indices of the tensors in the flat buffer, indices of the others); ``apart``:
  indices that keep their own buffers whatever their size. No flat buffer for fewer
  than two small tensors."""
  small = [i for i, s in enumerate(shapes) if math.prod(s) <= MAX_FLAT and i not in apart]
  if len(small) < 2:
    return [], list(range(len(shapes)))
  return small, [i for i in range(len(shapes)) if i not in set(small)]


class FlatLayout(NamedTuple):
  """Where each tensor lives in the flat buffer (static: a function of the shapes)."""

  shapes: tuple[tuple[int, ...], ...]

  @property
  def sizes(self) -> tuple[int, ...]:
    return tuple(math.prod(s) for s in self.shapes)

  @property
  def rows(self) -> tuple[int, ...]:
    return tuple(max(1, -(-n // ROW)) for n in self.sizes)

  @property
  def starts(self) -> tuple[int, ...]:
    """First row of each tensor."""
    return tuple(int(r) for r in np.cumsum((0,) + self.rows[:-1]))

  @property
  def num_rows(self) -> int:
    return sum(self.rows)


def explicitly_sharded(a) -> bool:
  """Whether ``a``'s type shards it along a mesh axis (an explicit mesh, traced or not).

  Such arrays need the reshapes and stacks that mix their axes spelled out (JAX raises
  ``ShardingTypeError`` otherwise); under an Auto mesh the compiler places them.
  """
  sharding = getattr(jax.typeof(a), "sharding", None)
  spec = getattr(sharding, "spec", None)
  return spec is not None and any(axis is not None for axis in spec)


def _sharding(leaf):
  if isinstance(leaf, jax.core.Tracer):
    return None
  return getattr(leaf, "sharding", None)


def flat_sharding(leaves: Sequence, dtypes: Sequence):
  """(use the flat layout, the sharding its buffers take); ``dtypes``: the state dtypes.

  Flat when there are two tensors or more, all with one state dtype, and every tensor
  is fully replicated on one common set of devices (a single device included; a traced
  tensor counts as replicated unless an explicit mesh shards it); the buffers then take
  that sharding (None: the default device).
  """
  if len(leaves) < 2 or len(set(dtypes)) > 1:
    return False, None
  if any(isinstance(a, jax.core.Tracer) and explicitly_sharded(a) for a in leaves):
    return False, None
  shardings = [s for s in map(_sharding, leaves) if s is not None]
  if any(not s.is_fully_replicated for s in shardings):
    return False, None
  if len({frozenset(s.device_set) for s in shardings}) > 1:
    return False, None
  return True, (shardings[0] if shardings else None)


def zeros(layout: FlatLayout, dtype, sharding=None) -> jax.Array:
  shape = (layout.num_rows, ROW)
  if sharding is None:
    return jnp.zeros(shape, dtype)
  return jnp.zeros(shape, dtype, device=sharding)


def pack(layout: FlatLayout, leaves: Sequence[jax.Array]) -> jax.Array:
  """The tensors in one ``[num_rows, ROW]`` buffer (each zero-padded to whole rows)."""
  pieces = [jnp.pad(jnp.reshape(a, -1), (0, r * ROW - n))
            for a, n, r in zip(leaves, layout.sizes, layout.rows)]
  return jnp.concatenate(pieces).reshape(layout.num_rows, ROW)


def unpack(layout: FlatLayout, buffer: jax.Array) -> list[jax.Array]:
  """The tensors of a flat buffer, in their shapes (inverse of :func:`pack`)."""
  flat = buffer.reshape(-1)
  return [flat[s * ROW:s * ROW + n].reshape(shape)
          for s, n, shape in zip(layout.starts, layout.sizes, layout.shapes)]


def row_tensor_ids(layout: FlatLayout, zero: jax.Array) -> jax.Array:
  """``[num_rows]`` int32: the tensor each row belongs to (sorted).

  Computed in the program from the ``num_tensors`` row starts (a scatter of ones and a
  cumulative sum) rather than embedded as a ``num_rows`` constant. ``zero`` is a
  runtime int32 zero that XLA cannot prove to be zero: from constants alone it would
  constant-fold the cumulative sum at compile time, taking seconds for 10^4 rows (an
  optimization barrier is removed before constant folding on XLA:CPU).
  """
  boundaries = jnp.zeros(layout.num_rows, jnp.int32).at[np.asarray(
      layout.starts[1:], np.int32)].add(1)
  return jnp.cumsum(boundaries + zero)


def valid_mask(layout: FlatLayout, ids: jax.Array) -> jax.Array:
  """``[num_rows, ROW]`` bool: True on the tensors' elements, False on padding."""
  last_row = np.asarray([s + r - 1 for s, r in zip(layout.starts, layout.rows)], np.int32)
  tail = np.asarray([n - (r - 1) * ROW for n, r in zip(layout.sizes, layout.rows)],
                    np.int32)
  row = jnp.arange(layout.num_rows, dtype=jnp.int32)
  in_row = jnp.where(row == jnp.asarray(last_row)[ids], jnp.asarray(tail)[ids], ROW)
  return jnp.arange(ROW, dtype=jnp.int32)[None, :] < in_row[:, None]


def segment_sums(layout: FlatLayout, ids: jax.Array, row_sums: jax.Array) -> jax.Array:
  """``[num_tensors, k]`` per-tensor sums from ``[k, num_rows]`` row sums."""
  return jax.ops.segment_sum(row_sums.T, ids, num_segments=len(layout.shapes),
                             indices_are_sorted=True)


def broadcast_rows(ids: jax.Array, per_tensor: jax.Array) -> jax.Array:
  """Per-tensor values ``[num_tensors, ...]`` as ``[..., num_rows, 1]`` for the buffer."""
  return jnp.moveaxis(per_tensor[ids], 0, -1)[..., None]
