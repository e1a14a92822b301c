"""Muon: parity with optax.contrib.muon (float64), a NumPy transcription of the equations
for what optax does differently (roles-based selection, >2-D views), and the
Newton-Schulz feature's properties.

Trajectories train a tree with an embedding, a conv kernel, 3-D attention kernels, dense
kernels (wide and tall), a readout and vectors on loss = 0.5 ||x||^2 with gradients
x + noise_k (noise fixed), for NUM_STEPS steps. Run with ``-s`` to print the max abs
differences (``PARITY muon...: <diff>``).
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metaopt import features
from metaopt import mup
from metaopt import optimizers as mo

NUM_STEPS = 60
NOISE = 0.3
# Float64 rounding is ~1e-16 relative per operation. Muon's updates have entries of
# order lr / sqrt(fan) and the parameters stay O(1); one step's Newton-Schulz adds a few
# hundred roundings that the quintic map can amplify by up to a^5 ~ 500 along small
# singular directions, so over 60 steps we allow 1e-11 (measured: ~1e-15-1e-14; float32
# would be ~1e-6).
TOL = 1e-11

# Leaf shapes in module (insertion) order, and what Muon must do with each: the
# [fan_in, fan_out] view for orthogonalized leaves, None for AdamW ones.
SHAPES = {
    "embed": {"embedding": (13, 8)},
    "attn": {"query": {"kernel": (8, 2, 4)}, "out": {"kernel": (2, 4, 8)}},
    "conv": {"kernel": (3, 1, 8, 6), "bias": (6,)},  # [*spatial, in, out]; tall view
    "Dense_0": {"kernel": (6, 10), "bias": (10,)},  # wide: scale sqrt(10 / 6)
    "norm": {"scale": (10,)},
    "head": {"kernel": (10, 5), "bias": (5,)},
}
VIEWS = {
    "embed": {"embedding": None},
    "attn": {"query": {"kernel": (8, 8)}, "out": {"kernel": (8, 8)}},
    "conv": {"kernel": (24, 6), "bias": None},
    "Dense_0": {"kernel": (6, 10), "bias": None},
    "norm": {"scale": None},
    "head": {"kernel": None, "bias": None},
}


def _is_shape(x):
  return x is None or (isinstance(x, tuple) and all(isinstance(d, int) for d in x))


def _tmap(fn, *trees):
  return jax.tree.map(fn, *trees, is_leaf=_is_shape)


def _roles():
  """The roles a muP practitioner gives SHAPES (what infer_roles also finds)."""
  def role(shape, view):
    if view is not None:
      return mup.hidden_role(view[0], 8)
    return mup.input_role(13) if shape == (13, 8) else (
        mup.output_role(10, 8) if shape == (10, 5) else mup.vector_role())
  return _tmap(role, SHAPES, VIEWS)


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  params = _tmap(lambda s: rng.normal(size=s), SHAPES)
  noise = _tmap(lambda s: rng.normal(size=(NUM_STEPS,) + s) * NOISE, SHAPES)
  return params, noise


def _run(opt, params, noise):
  """Trajectory of the parameters (stacked over steps) under ``opt``, in float64."""
  params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
  noise = jax.tree.map(lambda n: jnp.asarray(n, jnp.float64), noise)

  @jax.jit
  def run(params, noise):
    def step(carry, noise_k):
      p, state = carry
      grads = jax.tree.map(lambda x, n: x + n, p, noise_k)
      updates, state = opt.update(grads, state, p)
      p = optax.apply_updates(p, updates)
      return (p, state), p

    return jax.lax.scan(step, (params, opt.init(params)), noise)[1]

  return run(params, noise)


def _max_abs_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _assert_close(name, traj, ref_traj, params):
  assert jax.tree.leaves(traj)[0].dtype == jnp.float64
  diff = _max_abs_diff(traj, ref_traj)
  moved = _max_abs_diff(traj, jax.tree.map(lambda p: np.asarray(p)[None], params))
  print(f"PARITY {name}: {diff:.3e} (params moved up to {moved:.2f}, tol {TOL:g})")
  assert moved > 0.1, "the trajectory did not move: the test would prove nothing"
  assert diff < TOL


# ----------------------------------------------------------------------------------
# optax.contrib.muon, told the same split through muon_weight_dimension_numbers.


def _optax_dimension_numbers():
  dn = optax.contrib.MuonDimensionNumbers

  def numbers(shape, view):
    if view is None:
      return None
    axes = tuple(range(len(shape)))
    split = next(k for k in range(1, len(shape)) if math.prod(shape[:k]) == view[0])
    return dn(reduction_axis=axes[:split], output_axis=axes[split:])

  return _tmap(numbers, SHAPES, VIEWS)


def _matrices_only(params):
  """A weight-decay mask: the leaves with at least 2 dims (optax.masked's callable form)."""
  return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


OPTAX_CASES = {
    "muon": ({"weight_decay": 0.01}, {"weight_decay": 0.01}),
    "muon(nesterov=False, adaptive)": ({"nesterov": False, "adaptive": True},) * 2,
    "muon(consistent_rms, adam lr/decay, 3 ns steps)": (
        {"consistent_rms": 0.2, "adam_learning_rate": 0.003, "adam_weight_decay": 0.1,
         "adam_b1": 0.8, "beta": 0.9, "ns_steps": 3},) * 2,
    "muon(weight decay mask)": ({"weight_decay": 0.05, "mask": _matrices_only},
                                {"weight_decay": 0.05, "weight_decay_mask": _matrices_only}),
    "muon(per-step ns_coeffs table)": (
        {"ns_coeffs": ((4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377),
                       (3.7418, -5.5913, 2.3037))},) * 2,
}


@pytest.mark.skipif(not hasattr(optax.contrib, "MuonDimensionNumbers"),
                    reason="optax.contrib.muon without weight dimension numbers (< 0.2.6)")
@pytest.mark.parametrize("name", OPTAX_CASES)
def test_parity_with_optax_contrib_muon_float64(x64, name):
  del x64
  ours_kw, optax_kw = OPTAX_CASES[name]
  params, noise = _problem()
  ours = mo.muon(0.02, roles=_roles(), **ours_kw)
  ref = optax.contrib.muon(0.02, muon_weight_dimension_numbers=_optax_dimension_numbers(),
                           **optax_kw)
  _assert_close(name, _run(ours, params, noise), _run(ref, params, noise), params)


def test_optax_default_split_is_by_ndim_ours_by_role():
  """optax orthogonalizes every 2-D leaf by default; the embedding and readout are 2-D,
  the conv and attention kernels are not. Ours follows the roles instead."""
  params = _tmap(jnp.zeros, SHAPES)
  ours = mo.muon_labels(params, roles=_roles())
  assert ours == _tmap(lambda v: "adam" if v is None else "muon", VIEWS)
  by_ndim = jax.tree.map(lambda x: "muon" if x.ndim == 2 else "adam", params)
  differ = {jax.tree_util.keystr(p) for (p, a), b in zip(
      jax.tree_util.tree_flatten_with_path(ours)[0], jax.tree.leaves(by_ndim)) if a != b}
  # 2-D but not hidden (embedding, readout), and hidden but not 2-D (attention and conv
  # kernels).
  assert differ == {"['embed']['embedding']", "['head']['kernel']",
                    "['attn']['query']['kernel']",
                    "['attn']['out']['kernel']", "['conv']['kernel']"}


# ----------------------------------------------------------------------------------
# NumPy transcription of the equations (roles inferred, as for an unlabeled user tree).

A, B, C = features.NEWTON_SCHULZ_COEFFS


def _np_newton_schulz(m, steps=5, eps=1e-8):
  x = m.T if m.shape[0] > m.shape[1] else m
  x = x / (np.linalg.norm(x) + eps)
  for _ in range(steps):
    gram = x @ x.T
    x = A * x + (B * gram + C * gram @ gram) @ x
  return x.T if m.shape[0] > m.shape[1] else x


def _np_muon(params, noise, lr, *, beta=0.95, wd=0.0, b1=0.9, b2=0.999, eps=1e-8,
             adam_wd=0.0, decayed=None):
  """Muon (Nesterov) on the leaves with a view, Nesterov AdamW on the others; decay
  only on the leaves ``decayed`` (a dict by path) marks True (None: all)."""
  x = {k: np.array(v) for k, v in _flat(params).items()}
  on = {k: 1.0 if decayed is None else float(decayed[k]) for k in x}
  views = _flat(VIEWS)
  mu = {k: np.zeros_like(v) for k, v in x.items()}
  nu = {k: np.zeros_like(v) for k, v in x.items()}
  traj = []
  for t in range(1, NUM_STEPS + 1):
    for k in x:
      g = x[k] + _flat(noise)[k][t - 1]
      view = views[k]
      if view is not None:
        mu[k] = beta * mu[k] + (1 - beta) * g
        m_hat = beta * mu[k] / (1 - beta ** (t + 1)) + (1 - beta) * g / (1 - beta ** t)
        o = _np_newton_schulz(m_hat.reshape(view), eps=eps).reshape(x[k].shape)
        o = o * math.sqrt(max(1.0, view[1] / view[0]))
        x[k] = x[k] - lr * (o + on[k] * wd * x[k])
      else:
        mu[k] = b1 * mu[k] + (1 - b1) * g
        nu[k] = b2 * nu[k] + (1 - b2) * g * g
        m_hat = b1 * mu[k] / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1 ** t)
        v_hat = nu[k] / (1 - b2 ** t)
        x[k] = x[k] - lr * (m_hat / (np.sqrt(v_hat) + eps) + on[k] * adam_wd * x[k])
    traj.append(dict(x))
  return {k: np.stack([s[k] for s in traj]) for k in x}


def _flat(tree):
  return {jax.tree_util.keystr(p): v for p, v in
          jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_shape)[0]}


def test_matches_numpy_transcription_with_inferred_roles(x64):
  del x64
  params, noise = _problem(seed=1)
  with warnings.catch_warnings():
    warnings.simplefilter("error", mup.RoleInferenceWarning)  # an unambiguous tree
    opt = mo.muon(0.03, weight_decay=0.05, adam_weight_decay=0.02)  # roles inferred
    traj = _run(opt, params, noise)
  ref = _np_muon(params, noise, 0.03, wd=0.05, adam_wd=0.02)
  _assert_close("muon vs NumPy (inferred roles)", _flat(traj), ref, _flat(params))


# A prefix tree (optax.masked semantics): a bool decides for its whole subtree.
_PREFIX_MASK = {"embed": True, "attn": {"query": False, "out": True},
                "conv": {"kernel": True, "bias": False}, "Dense_0": False, "norm": True,
                "head": {"kernel": False, "bias": True}}


@pytest.mark.parametrize("mask", [_PREFIX_MASK, _matrices_only], ids=["prefix", "callable"])
def test_mask_selects_decayed_leaves_of_both_parts(x64, mask):
  """``mask=`` decays the leaves it selects, in the Muon and the AdamW part alike."""
  del x64
  params, noise = _problem(seed=2)
  opt = mo.muon(0.03, weight_decay=0.2, adam_weight_decay=0.1, roles=_roles(), mask=mask)
  tree = mask(_tmap(np.zeros, SHAPES)) if callable(mask) else mask
  decayed = {k: bool(v) for k, v in _flat(jax.tree.map(
      lambda m, sub: jax.tree.map(lambda _: m, sub), tree, _tmap(np.zeros, SHAPES))).items()}
  assert 0 < sum(decayed.values()) < len(decayed)
  ref = _np_muon(params, noise, 0.03, wd=0.2, adam_wd=0.1, decayed=decayed)
  _assert_close("muon(mask) vs NumPy", _flat(_run(opt, params, noise)), ref, _flat(params))
  # The decay matters on this problem, so a mask that was ignored would fail above.
  unmasked = _np_muon(params, noise, 0.03, wd=0.2, adam_wd=0.1)
  assert _max_abs_diff(unmasked, ref) > 1e3 * TOL


def test_labels_select_like_roles():
  params = _tmap(jnp.zeros, SHAPES)
  labels = jax.tree.map(lambda r: r.kind, _roles(), is_leaf=mup.is_role)
  assert mo.muon_labels(params, labels=labels) == mo.muon_labels(params, roles=_roles())
  grads = jax.tree.map(jnp.ones_like, params)
  by_roles, by_labels = mo.muon(0.02, roles=_roles()), mo.muon(0.02, labels=labels)
  u1, _ = jax.jit(by_roles.update)(grads, by_roles.init(params), params)
  u2, _ = jax.jit(by_labels.update)(grads, by_labels.init(params), params)
  assert _max_abs_diff(u1, u2) == 0.0


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="roles= or labels="):
    mo.muon(0.02, roles=_roles(), labels="hidden")
  with pytest.raises(ValueError, match="ns_coeffs"):
    mo.muon(0.02, ns_coeffs=(1.0, 2.0))
  with pytest.raises(ValueError, match="ns_steps"):
    mo.muon(0.02, ns_steps=0)
  with pytest.raises(ValueError, match=r"consistent_rms.*\(0"):
    mo.muon(0.02, consistent_rms=-0.2)
  with pytest.raises(ValueError, match="rank >= 2"):
    mo.scale_by_muon().init({"b": jnp.zeros(3)})
  with pytest.raises(ValueError, match="do not match"):
    mo.muon(0.02, roles={"w": mup.vector_role()}).init({"v": jnp.zeros(3)})


# ----------------------------------------------------------------------------------
# Newton-Schulz: singular values in the documented band, singular vectors kept.


def _matrix_with_spectrum(rng, rows, cols, svals):
  u, _ = np.linalg.qr(rng.normal(size=(rows, len(svals))))
  v, _ = np.linalg.qr(rng.normal(size=(cols, len(svals))))
  return (u * svals) @ v.T, u, v


def _scalar_iteration(s, steps=5):
  for _ in range(steps):
    s = A * s + B * s ** 3 + C * s ** 5
  return s


@pytest.mark.parametrize("rows, cols", [(16, 16), (8, 40), (40, 8), (32, 24)])
def test_newton_schulz_singular_values_in_band(x64, rows, cols):
  """Full rank, condition number <= 100, so every s / ||M||_F >= 1.6e-3: each singular
  value lands in the documented band [0.68, 1.21] (the range of 5 steps of the scalar
  quintic map there); U and V are those of the input, and each singular value follows
  the scalar map of s / ||M||_F."""
  del x64
  rng = np.random.default_rng(rows * cols)
  k = min(rows, cols)
  svals = np.geomspace(1.0, 0.01, k) * rng.uniform(0.5, 2.0)
  m, u, v = _matrix_with_spectrum(rng, rows, cols, svals)
  out = np.asarray(features.newton_schulz_orthogonalize(jnp.asarray(m)))
  s_out = np.linalg.svd(out, compute_uv=False)
  assert s_out.min() > 0.68 and s_out.max() < 1.21, s_out
  expected = _scalar_iteration(svals / (np.linalg.norm(m) + 1e-8))
  np.testing.assert_allclose(out, (u * expected) @ v.T, atol=1e-12)
  # float32 lands in the same band.
  out32 = features.newton_schulz_orthogonalize(jnp.asarray(m, jnp.float32))
  assert out32.dtype == jnp.float32
  s32 = np.linalg.svd(np.asarray(out32, np.float64), compute_uv=False)
  assert s32.min() > 0.68 and s32.max() < 1.21, s32


def test_newton_schulz_batches_and_edge_cases():
  rng = np.random.default_rng(0)
  batch = jnp.asarray(rng.normal(size=(2, 3, 5, 7)), jnp.float32)
  out = features.newton_schulz_orthogonalize(batch)
  assert out.shape == batch.shape
  for i in range(2):
    for j in range(3):
      np.testing.assert_allclose(out[i, j], features.newton_schulz_orthogonalize(batch[i, j]),
                                 rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jax.jit(jax.vmap(features.newton_schulz_orthogonalize))(batch),
                             out, rtol=1e-5, atol=1e-6)
  zeros = features.newton_schulz_orthogonalize(jnp.zeros((4, 3)))
  np.testing.assert_array_equal(zeros, 0.0)
  bf16 = features.newton_schulz_orthogonalize(batch.astype(jnp.bfloat16))
  assert bf16.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(bf16)))
  with pytest.raises(ValueError, match="needs a matrix"):
    features.newton_schulz_orthogonalize(jnp.zeros(3))


def test_muon_direction_flattens_conv_kernels_and_scales_by_shape():
  rng = np.random.default_rng(0)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)
  out = features.muon_direction(kernel, fan_in=18)
  flat = features.newton_schulz_orthogonalize(kernel.reshape(18, 4))  # scale 1 (tall)
  np.testing.assert_allclose(out, flat.reshape(3, 3, 2, 4), rtol=1e-6)
  assert features.muon_shape_scale(6, 10) == math.sqrt(10 / 6)
  assert features.muon_shape_scale(10, 6) == 1.0
  assert features.muon_shape_scale(6, 10, consistent_rms=0.2) == math.sqrt(10) * 0.2
  with pytest.raises(ValueError, match="no 2-D view"):
    features.muon_direction(kernel, fan_in=5)
