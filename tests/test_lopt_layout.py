"""The learned optimizer's flat state layout (unsharded trees) against the per-tensor one.

Both layouts run the same pass functions; they differ only in how the per-tensor sums
are taken (segment sums over 128-element rows vs a sum per tensor) and so in float32
reduction order. Over a few steps of the shipped artifact that order moves the
per-tensor statistics by ~1e-6 relative, which the features, the MLP and the exp of a
clipped magnitude carry through smooth maps: updates agree to ~1e-5 of their scale,
while a layout bug (a wrong offset, padding counted in a statistic, a tensor's scalar
applied to its neighbour) changes them by O(1). The artifact is 0.2.0's (the base rule,
no Muon switch: the counts of buffers and fusions below are that rule's).
"""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metaopt
from metaopt.lopt import _engine
from metaopt.lopt import _layout
from metaopt.lopt import _update


def _tree():
  k = jax.random.split(jax.random.key(0), 6)
  return {"scalar": jnp.asarray(0.3), "vector": jax.random.normal(k[0], (300,)),
          "matrix": jax.random.normal(k[1], (64, 33)) * 0.1,
          "conv": jax.random.normal(k[2], (3, 3, 8, 16)) * 0.1,
          "big": jax.random.normal(k[3], (513, 512)) * 0.05,  # above 2^18 elements
          "matrix2": jax.random.normal(k[4], (64, 33)) * 0.1}


def _run(lo, params, flat, with_value, steps=6):
  config, theta = lo.config, lo.theta
  scales = jax.tree.map(lambda _: 1.0, params)
  state = _update.init_state(params, scales, flat=flat)
  assert _update.is_flat(state) == flat
  step = jax.jit(lambda g, s, p: _update.update(
      config, theta, g, s, p, value=jnp.float32(2.0) if with_value else None,
      num_steps=50, skip_nonfinite=True))
  out = []
  for i in range(steps):
    grads = jax.tree.map(lambda a, i=i: jnp.cos(a * (i + 1)) * 0.1 + 0.01 * i, params)
    updates, state = step(grads, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    out.append(updates)
  return out, state


@pytest.mark.parametrize("with_value", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_flat_layout_gives_the_per_tensor_layouts_updates(with_value):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    lo = metaopt.pretrained("v0.2.0")
  params = _tree()
  flat, flat_state = _run(lo, params, True, with_value)
  ref, ref_state = _run(lo, params, False, with_value)
  for step_flat, step_ref in zip(flat, ref):
    for name in params:
      a, b = np.asarray(step_flat[name]), np.asarray(step_ref[name])
      assert a.shape == b.shape
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.max(np.abs(b)) + 1e-12,
                                 err_msg=name)
  # The flat buffer holds the small tensors' buffers, zero on the padding; the tensor
  # above _layout.MAX_FLAT elements keeps its own.
  shapes = [jnp.shape(a) for a in jax.tree.leaves(params)]
  small, large = _layout.partition(shapes)
  assert len(small) == 5 and [shapes[i] for i in large] == [(513, 512)]
  layout = _layout.FlatLayout(tuple(shapes[i] for i in small))
  ref_leaves = jax.tree.leaves(ref_state.second_moment)
  got = _layout.unpack(layout, flat_state.second_moment.flat)
  got += list(flat_state.second_moment.tensors)
  for got_leaf, i in zip(got, small + large):
    np.testing.assert_allclose(got_leaf, ref_leaves[i], rtol=1e-4, atol=1e-12)
  packed = np.asarray(flat_state.momenta[0].flat).reshape(-1)
  mask = np.asarray(_layout.valid_mask(layout, _layout.row_tensor_ids(
      layout, jnp.int32(0)))).reshape(-1)
  assert np.all(packed[~mask] == 0) and np.any(packed[mask] != 0)
  assert int(flat_state.count) == int(ref_state.count) == len(flat)


def test_own_copy_passes_give_the_shared_passes_updates(monkeypatch):
  """Blocks above _engine.OWN_COPY_MIN elements read each pass's inputs on their own
  copy (a runtime identity, so XLA keeps each pass's features in its own fusion); with
  the bound at 0 every block does, flat buffer and the large tensor's own buffer alike.
  Same math: the same updates and state to float32 rounding (fusion changes the order
  of a few float32 operations)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    lo = metaopt.pretrained("v0.2.0")
  params = _tree()
  ref, ref_state = _run(lo, params, True, True, steps=3)
  monkeypatch.setattr(_engine, "OWN_COPY_MIN", 0)
  got, got_state = _run(lo, params, True, True, steps=3)
  for step_got, step_ref in zip(got, ref):
    for name in params:
      b = np.asarray(step_ref[name])
      np.testing.assert_allclose(step_got[name], b, rtol=0,
                                 atol=1e-5 * np.max(np.abs(b)) + 1e-12, err_msg=name)
  for a, b in zip(jax.tree.leaves(got_state), jax.tree.leaves(ref_state)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-12)


def test_pack_unpack_round_trip_and_row_ids():
  shapes = [(), (5,), (128,), (129,), (3, 100), (2, 2, 64)]
  leaves = [jnp.arange(np.prod(s), dtype=jnp.float32).reshape(s) + i for i, s in
            enumerate(shapes)]
  layout = _layout.FlatLayout(tuple(shapes))
  assert layout.rows == (1, 1, 1, 2, 3, 2)
  buf = _layout.pack(layout, leaves)
  assert buf.shape == (10, _layout.ROW)
  for got, want in zip(_layout.unpack(layout, buf), leaves):
    np.testing.assert_array_equal(got, want)
  ids = _layout.row_tensor_ids(layout, jnp.int32(0))
  np.testing.assert_array_equal(ids, [0, 1, 2, 3, 3, 4, 4, 4, 5, 5])
  sums = _layout.segment_sums(layout, ids, jnp.sum(buf, axis=1)[None])
  np.testing.assert_allclose(sums[:, 0], [float(jnp.sum(a)) for a in leaves])


def _mlp_fusions(num_tensors):
  """Fused computations of the compiled update that hold (most of) the MLP."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    opt = metaopt.pretrained("v0.2.0").as_optax(num_steps=100)
  params = {f"w{i}": jax.ShapeDtypeStruct((32, 16 + i), jnp.float32)
            for i in range(num_tensors)}
  state = jax.eval_shape(opt.init, params)
  hlo = jax.jit(opt.update).lower(params, state, params).compile().as_text()
  bodies = [c for c in hlo.split("\n\n") if c.startswith("%fused")]
  hidden = metaopt.pretrained("v0.2.0").config.hidden_size
  # The MLP's first layer alone is (features x hidden) multiplies.
  return sum(len(re.findall(r" multiply\(", c)) > 10 * hidden for c in bodies)


def test_compiled_update_holds_the_mlp_once_however_many_tensors():
  # XLA fuses cheap producers into every consumer: without the flat layout's guard the
  # MLP is compiled once per tensor (its slice of the flat update), and compile time
  # grows with the number of tensors.
  few, many = _mlp_fusions(3), _mlp_fusions(12)
  assert 1 <= many == few <= 2, (few, many)
