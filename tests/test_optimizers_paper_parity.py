"""Parity of the optimizers that optax lacks with NumPy transcriptions of their papers.

Each reference below is written from the paper's equations (or, where named, the
official code) one tensor at a time, in float64. Both sides see the same gradient oracle
(a function of their own parameters), run 50 steps on a pytree holding a scalar, a
vector, a matrix and a 4-D conv kernel, and must agree to 1e-10 at every step. The max
abs difference of each optimizer is printed (run with ``-s``) and summarized at the end.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metaopt.optimizers as mo

STEPS = 50
TOL = 1e-10
SHAPES = {"scalar": (), "vector": (7,), "matrix": (5, 4), "conv": (3, 2, 3, 3)}
MAX_ABS_DIFF: dict[str, float] = {}


@pytest.fixture(autouse=True)
def x64():
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", previous)


@pytest.fixture(scope="module", autouse=True)
def report_max_abs_diff():
  yield
  print("\nmax |ours - reference| over 50 steps (float64):")
  for name, diff in MAX_ABS_DIFF.items():
    print(f"  {name:32s} {diff:.3e}")


# ---------------------------------------------------------------------------------
# Problem: random parameters and a deterministic, parameter-dependent gradient oracle.

def _initial_params(seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=s) for k, s in SHAPES.items()}


_TARGET = _initial_params(seed=1)
_NOISE = [_initial_params(seed=100 + t) for t in range(STEPS + 1)]


def quadratic_grad(params, t):
  """Noisy quadratic: g = (theta - target) + 0.5 * noise_t."""
  return {k: (params[k] - _TARGET[k]) + 0.5 * _NOISE[t][k] for k in params}


def _rows(x):
  return x.reshape(x.shape[0], -1)


def _orthogonal_rows(n, x):
  """n with each row (channel view) made orthogonal to the same row of x."""
  n2, x2 = _rows(n), _rows(x)
  coef = np.sum(n2 * x2, axis=1, keepdims=True) / np.sum(x2 * x2, axis=1, keepdims=True)
  return (n2 - coef * x2).reshape(x.shape)


def channel_orthogonal_grad(params, t):
  """Gradients orthogonal to every channel of every ndim > 1 parameter (AdamP projects)."""
  g = quadratic_grad(params, t)
  return {k: _orthogonal_rows(v, params[k]) if v.ndim > 1 else v for k, v in g.items()}


def layer_orthogonal_grad(params, t):
  """Per-channel cosines far from 0, whole-layer cosine exactly 0 (the layer view projects)."""
  g = {}
  for k, x in params.items():
    noise = 0.3 * _NOISE[t][k]
    if x.ndim <= 1:
      g[k] = noise
      continue
    x2 = _rows(x)
    a = np.random.default_rng(500 + t).normal(size=x2.shape[0])
    a -= a.mean()  # sum_i <a_i x_i / ||x_i||^2, x_i> = sum_i a_i = 0
    radial = a[:, None] * x2 / np.sum(x2 * x2, axis=1, keepdims=True)
    g[k] = (radial * np.sqrt(x2.shape[1])).reshape(x.shape) + _orthogonal_rows(noise, x)
  return g


def aligned_grad(params, t):
  """Gradients strongly aligned with the parameters (AdamP never projects).

  The noise scales with the parameters' RMS so the alignment survives their shrinking.
  """
  return {k: 0.5 * x + 0.1 * np.sqrt(np.mean(x * x)) * _NOISE[t][k]
          for k, x in params.items()}


# ---------------------------------------------------------------------------------
# Runners.

def run_ours(opt, grad_fn, params0):
  params = {k: jnp.asarray(v) for k, v in params0.items()}
  state = opt.init(params)
  update = jax.jit(opt.update)
  trajectory = []
  for t in range(1, STEPS + 1):
    grads = grad_fn({k: np.asarray(v) for k, v in params.items()}, t)
    updates, state = update({k: jnp.asarray(v) for k, v in grads.items()}, state, params)
    params = optax.apply_updates(params, updates)
    trajectory.append({k: np.asarray(v) for k, v in params.items()})
  return trajectory


def run_reference(leaf_step, grad_fn, params0):
  """leaf_step(x, g, state_dict, t) -> new x, applied to every leaf with its own state."""
  params = {k: np.array(v, dtype=np.float64) for k, v in params0.items()}
  states = {k: {} for k in params}
  trajectory = []
  for t in range(1, STEPS + 1):
    grads = grad_fn(params, t)
    params = {k: leaf_step(params[k], grads[k], states[k], t) for k in params}
    trajectory.append(params)
  return trajectory, states


def assert_parity(name, opt, leaf_step, grad_fn=quadratic_grad):
  params0 = _initial_params()
  ours = run_ours(opt, grad_fn, params0)
  ref, states = run_reference(leaf_step, grad_fn, params0)
  diff = max(float(np.max(np.abs(a[k] - b[k]))) for a, b in zip(ours, ref) for k in a)
  moved = max(float(np.max(np.abs(ref[-1][k] - params0[k]))) for k in params0)
  MAX_ABS_DIFF[name] = diff
  print(f"{name}: max abs diff {diff:.3e} (params moved up to {moved:.3f})")
  assert moved > 1e-3, "the reference barely moved; the comparison would be vacuous"
  assert diff < TOL
  return states


def _zeros_like(state, key, x):
  if key not in state:
    state[key] = np.zeros_like(x)
  return state[key]


# ---------------------------------------------------------------------------------
# Paper transcriptions and parity tests.

def _tam_momentum(x, g, st, beta, gamma, eps):
  """TAM (arXiv:2412.18790): per-tensor cosine, smoothed, damping, momentum."""
  m = _zeros_like(st, "m", x)
  denom = np.linalg.norm(m) * np.linalg.norm(g)
  s = float(np.sum(m * g) / denom) if denom > 1e-12 else 0.0
  st["s_hat"] = gamma * st.get("s_hat", 0.0) + (1 - gamma) * s
  d = (1 + st["s_hat"]) / 2
  st["m"] = beta * m + (eps + d) * g
  return st["m"]


def test_tam_parity():
  lr, beta, gamma, eps, wd = 0.02, 0.9, 0.9, 1e-8, 0.01

  def step(x, g, st, t):
    m = _tam_momentum(x, g, st, beta, gamma, eps)
    return x - lr * (m + wd * x)

  assert_parity("tam", mo.tam(lr, beta=beta, gamma=gamma, eps=eps, weight_decay=wd), step)


def test_adatam_parity():
  lr, beta, gamma, b2, eps, wd = 0.01, 0.9, 0.9, 0.999, 1e-8, 0.01

  def step(x, g, st, t):
    m = _tam_momentum(x, g, st, beta, gamma, eps)
    st["v"] = b2 * _zeros_like(st, "v", x) + (1 - b2) * g * g
    v_hat = st["v"] / (1 - b2**t)  # documented choice: v is bias-corrected
    return x - lr * (m / (np.sqrt(v_hat) + eps) + wd * x)

  opt = mo.adatam(lr, beta=beta, gamma=gamma, b2=b2, eps=eps, weight_decay=wd)
  assert_parity("adatam", opt, step)


def _cautious_phi(u, g):
  phi = (u * g > 0).astype(np.float64)
  return phi / max(phi.mean(), 1e-3)


def test_cautious_adamw_parity():
  lr, b1, b2, eps, wd = 0.01, 0.9, 0.999, 1e-8, 0.05

  def step(x, g, st, t):
    x = x * (1 - lr * wd)  # C-Optim: decoupled decay first
    st["m"] = b1 * _zeros_like(st, "m", x) + (1 - b1) * g
    st["v"] = b2 * _zeros_like(st, "v", x) + (1 - b2) * g * g
    m_hat, v_hat = st["m"] / (1 - b1**t), st["v"] / (1 - b2**t)
    phi = _cautious_phi(st["m"], g)
    return x - lr * m_hat * phi / (np.sqrt(v_hat) + eps)

  opt = mo.cautious_adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd)
  assert_parity("cautious_adamw", opt, step)


def test_cautious_lion_parity():
  lr, b1, b2, wd = 0.01, 0.9, 0.99, 0.05

  def step(x, g, st, t):
    m = _zeros_like(st, "m", x)
    u = np.sign(b1 * m + (1 - b1) * g)
    st["m"] = b2 * m + (1 - b2) * g
    return x - lr * (u * _cautious_phi(u, g) + wd * x)

  opt = mo.cautious_lion(lr, b1=b1, b2=b2, weight_decay=wd)
  assert_parity("cautious_lion", opt, step)


def test_cautious_wrapper_around_heavy_ball_parity():
  lr, decay, wd = 0.01, 0.9, 0.05

  def step(x, g, st, t):
    st["m"] = decay * _zeros_like(st, "m", x) + g  # optax.trace
    return x - lr * (st["m"] * _cautious_phi(st["m"], g) + wd * x)

  opt = mo.cautious(optax.trace(decay=decay), lr, weight_decay=wd)
  assert_parity("cautious(optax.trace)", opt, step)


def test_grams_parity():
  lr, b1, b2, eps, wd = 0.01, 0.9, 0.999, 1e-6, 0.05

  def step(x, g, st, t):
    st["m"] = b1 * _zeros_like(st, "m", x) + (1 - b1) * g
    st["v"] = b2 * _zeros_like(st, "v", x) + (1 - b2) * g * g
    m_hat, v_hat = st["m"] / (1 - b1**t), st["v"] / (1 - b2**t)
    return x - lr * (np.sign(g) * np.abs(m_hat / (np.sqrt(v_hat) + eps)) + wd * x)

  assert_parity("grams", mo.grams(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd), step)


def test_laprop_parity():
  lr, b1, b2, eps, wd = 0.01, 0.9, 0.999, 1e-15, 0.05

  def step(x, g, st, t):
    # Official code's form (learning rate inside the momentum, lr-EMA bias correction),
    # with decoupled AdamW decay on the old parameters.
    st["v"] = b2 * _zeros_like(st, "v", x) + (1 - b2) * g * g
    st["lr1"] = st.get("lr1", 0.0) * b1 + (1 - b1) * lr
    st["lr2"] = st.get("lr2", 0.0) * b2 + (1 - b2)
    denom = np.sqrt(st["v"] / st["lr2"]) + eps
    st["m"] = b1 * _zeros_like(st, "m", x) + (1 - b1) * lr * g / denom
    return x - st["m"] / (st["lr1"] / lr) - lr * wd * x

  assert_parity("laprop", mo.laprop(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd), step)


def test_adan_parity_with_official_proximal_form():
  lr, b1, b2, b3, eps, wd = 0.01, 0.98, 0.92, 0.99, 1e-8, 0.05

  def step(x, g, st, t):
    # sail-sg/Adan _single_tensor_adan, no_prox=False.
    if t == 1:
      st["neg_prev"] = -g
    diff = st["neg_prev"] + g
    st["m"] = b1 * _zeros_like(st, "m", x) + (1 - b1) * g
    st["v"] = b2 * _zeros_like(st, "v", x) + (1 - b2) * diff
    st["n"] = b3 * _zeros_like(st, "n", x) + (1 - b3) * (g + b2 * diff) ** 2
    denom = np.sqrt(st["n"]) / np.sqrt(1 - b3**t) + eps
    x = x - lr / (1 - b1**t) * st["m"] / denom - lr * b2 / (1 - b2**t) * st["v"] / denom
    st["neg_prev"] = -g
    return x / (1 + lr * wd)

  opt = mo.adan(lr, b1=b1, b2=b2, b3=b3, eps=eps, weight_decay=wd)
  assert_parity("adan (paper, proximal)", opt, step)


def test_adan_documented_optax_deviation():
  """Equal to optax.scale_by_adan at step 1 (no difference term yet), not at step 2."""
  params = _initial_params()
  g1, g2 = quadratic_grad(params, 1), quadratic_grad(params, 2)
  ours, theirs = mo.scale_by_adan(), optax.scale_by_adan(b1=0.98, b2=0.92, b3=0.99)
  s_ours, s_theirs = ours.init(params), theirs.init(params)
  u1, s_ours = ours.update(g1, s_ours, params)
  v1, s_theirs = theirs.update(g1, s_theirs, params)
  u2, _ = ours.update(g2, s_ours, params)
  v2, _ = theirs.update(g2, s_theirs, params)
  for k in params:
    np.testing.assert_allclose(u1[k], v1[k], rtol=1e-12, atol=1e-14)
    assert np.max(np.abs(np.asarray(u2[k]) - np.asarray(v2[k]))) > 1e-3


def test_mars_adamw_parity():
  lr, b1, b2, gamma, eps, wd = 0.01, 0.95, 0.99, 0.025, 1e-8, 0.05

  def step(x, g, st, t):
    # AGI-Arena/MARS update_fn (mars-adamw, approx), with last_grad := g_1 at step 1.
    last = g if t == 1 else st["last"]
    c = (g - last) * (gamma * (b1 / (1 - b1))) + g
    norm = np.linalg.norm(c)
    st.setdefault("clipped", []).append(bool(norm > 1))
    if norm > 1:
      c = c / norm
    st["m"] = b1 * _zeros_like(st, "m", x) + (1 - b1) * c
    st["v"] = b2 * _zeros_like(st, "v", x) + (1 - b2) * c * c
    denom = (np.sqrt(st["v"]) / np.sqrt(1 - b2**t) + eps) * (1 - b1**t)
    st["last"] = g
    return x - lr * (x * wd + st["m"] / denom)

  opt = mo.mars_adamw(lr, b1=b1, b2=b2, gamma=gamma, eps=eps, weight_decay=wd)
  states = assert_parity("mars_adamw", opt, step)
  clipped = [c for st in states.values() for c in st["clipped"]]
  assert any(clipped) and not all(clipped)  # both branches of the clip were exercised


def _adamp_projection_ref(x, g, perturb, delta, wd_ratio, eps, st):
  """clovaai/AdamP _projection: channel view, then layer view."""
  expand = [-1] + [1] * (x.ndim - 1)
  for view_name, view in (("channel", _rows), ("layer", lambda a: a.reshape(1, -1))):
    gv, xv = view(g), view(x)
    cos = np.sum(gv / np.maximum(np.linalg.norm(gv, axis=1, keepdims=True), eps)
                 * xv / np.maximum(np.linalg.norm(xv, axis=1, keepdims=True), eps), axis=1)
    if np.abs(cos).max() < delta / np.sqrt(xv.shape[1]):
      p_n = x / (np.linalg.norm(xv, axis=1).reshape(expand) + eps)
      perturb = perturb - p_n * view(p_n * perturb).sum(axis=1).reshape(expand)
      st.setdefault("projected", []).append(view_name)
      return perturb, wd_ratio
  st.setdefault("projected", []).append(None)
  return perturb, 1.0


def _adamp_step(lr, b1, b2, eps, wd, delta, wd_ratio, nesterov):

  def step(x, g, st, t):
    st["m"] = b1 * _zeros_like(st, "m", x) + (1 - b1) * g
    st["v"] = b2 * _zeros_like(st, "v", x) + (1 - b2) * g * g
    denom = np.sqrt(st["v"]) / np.sqrt(1 - b2**t) + eps
    step_size = lr / (1 - b1**t)
    perturb = ((b1 * st["m"] + (1 - b1) * g) if nesterov else st["m"]) / denom
    ratio = 1.0
    if x.ndim > 1:
      perturb, ratio = _adamp_projection_ref(x, g, perturb, delta, wd_ratio, eps, st)
    x = x * (1 - lr * wd * ratio)
    return x - step_size * perturb

  return step


ADAMP_CASES = {
    "aligned (no projection)": (aligned_grad, False, None),
    "channel-orthogonal": (channel_orthogonal_grad, False, "channel"),
    "layer-orthogonal, nesterov": (layer_orthogonal_grad, True, "layer"),
}


@pytest.mark.parametrize("case", list(ADAMP_CASES))
def test_adamp_parity(case):
  grad_fn, nesterov, expected_view = ADAMP_CASES[case]
  hp = dict(lr=0.01, b1=0.9, b2=0.999, eps=1e-8, wd=0.1, delta=0.1, wd_ratio=0.1)
  opt = mo.adamp(hp["lr"], b1=hp["b1"], b2=hp["b2"], eps=hp["eps"], weight_decay=hp["wd"],
                 delta=hp["delta"], wd_ratio=hp["wd_ratio"], nesterov=nesterov)
  states = assert_parity(f"adamp [{case}]", opt, _adamp_step(nesterov=nesterov, **hp),
                         grad_fn)
  for name in ("matrix", "conv"):
    assert states[name]["projected"] == [expected_view] * STEPS


def _sgdp_step(lr, momentum, dampening, wd, delta, wd_ratio, nesterov, eps):

  def step(x, g, st, t):
    st["buf"] = momentum * _zeros_like(st, "buf", x) + (1 - dampening) * g
    d_p = g + momentum * st["buf"] if nesterov else st["buf"]
    ratio = 1.0
    if x.ndim > 1:
      d_p, ratio = _adamp_projection_ref(x, g, d_p, delta, wd_ratio, eps, st)
    x = x * (1 - lr * wd * ratio / (1 - momentum))
    return x - lr * d_p

  return step


SGDP_CASES = {
    "aligned (no projection)": (aligned_grad, False, None),
    "channel-orthogonal, nesterov": (channel_orthogonal_grad, True, "channel"),
    "layer-orthogonal": (layer_orthogonal_grad, False, "layer"),
}


@pytest.mark.parametrize("case", list(SGDP_CASES))
def test_sgdp_parity(case):
  grad_fn, nesterov, expected_view = SGDP_CASES[case]
  hp = dict(lr=0.01, momentum=0.9, dampening=0.1, wd=0.05, delta=0.1, wd_ratio=0.1,
            eps=1e-8)
  opt = mo.sgdp(hp["lr"], momentum=hp["momentum"], dampening=hp["dampening"],
                weight_decay=hp["wd"], delta=hp["delta"], wd_ratio=hp["wd_ratio"],
                nesterov=nesterov, eps=hp["eps"])
  states = assert_parity(f"sgdp [{case}]", opt, _sgdp_step(nesterov=nesterov, **hp), grad_fn)
  for name in ("matrix", "conv"):
    assert states[name]["projected"] == [expected_view] * STEPS


# ---------------------------------------------------------------------------------
# The cautious mask: which coordinates it zeroes, and what it leaves alone.

def test_cautious_mask_zeroes_disagreeing_coordinates_not_weight_decay():
  lr, wd = 0.1, 0.1
  params = {"w": jnp.array([1.0, -2.0, 3.0, -4.0])}
  opt = mo.cautious(optax.trace(decay=0.9), lr, weight_decay=wd)
  state = opt.init(params)
  _, state = opt.update({"w": jnp.ones(4)}, state, params)
  g = jnp.array([-0.5, 2.0, -0.3, 1.0])  # momentum 0.9 + g = [0.4, 2.9, 0.6, 1.9]
  updates, _ = opt.update({"w": g}, state, params)
  u = 0.9 + g
  disagree = np.asarray(u * g <= 0)
  np.testing.assert_array_equal(disagree, [True, False, True, False])
  phi = np.where(disagree, 0.0, 1.0 / 0.5)  # renormalized by the agreeing fraction
  expected = -lr * (u * phi + wd * params["w"])
  np.testing.assert_allclose(updates["w"], expected, rtol=1e-12)
  # Disagreeing coordinates keep exactly the (unmasked) decoupled decay.
  np.testing.assert_allclose(updates["w"][disagree], -lr * wd * params["w"][disagree],
                             rtol=1e-12)
  direction, _ = mo.scale_by_cautious(optax.trace(decay=0.9)).update(
      {"w": g}, state[0], params)
  np.testing.assert_array_equal(np.asarray(direction["w"])[disagree], 0.0)


def test_cautious_adamw_masks_against_current_gradient():
  lr, wd = 0.01, 0.5
  params = {"w": jnp.array([1.0, 2.0, -3.0])}
  opt = mo.cautious_adamw(lr, weight_decay=wd)
  state = opt.init(params)
  _, state = opt.update({"w": jnp.array([1.0, 1.0, 1.0])}, state, params)
  updates, _ = opt.update({"w": jnp.array([-0.01, 1.0, -0.01])}, state, params)
  # m_2 = 0.09 + 0.1 g > 0 everywhere, so coordinates 0 and 2 disagree with g.
  np.testing.assert_allclose(updates["w"][jnp.array([0, 2])],
                             -lr * wd * params["w"][jnp.array([0, 2])], rtol=1e-12)
  assert abs(float(updates["w"][1]) + lr * wd * 2.0) > 1e-3  # the agreeing one steps


def test_cautious_passes_extra_args_to_base():

  def scale_by_value():
    def update_fn(updates, state, params=None, *, value):
      del params
      return jax.tree.map(lambda g: value * g, updates), state
    return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update_fn)

  opt = mo.cautious(scale_by_value(), learning_rate=1.0)
  params = {"w": jnp.array([1.0, -1.0])}
  state = opt.init(params)
  g = {"w": jnp.array([2.0, 3.0])}
  updates, _ = opt.update(g, state, params, value=3.0)
  np.testing.assert_allclose(updates["w"], -3.0 * g["w"])  # all agree: phi = 1
  updates, _ = opt.update(g, state, params, value=-1.0)  # all disagree: phi = 0
  np.testing.assert_allclose(updates["w"], 0.0)
  with pytest.raises(TypeError):
    opt.update(g, state, params)
