"""Parity of the classical optimizers with optax (float64) or the paper (NumPy).

Every run trains the same random pytree (a scalar, a vector, a matrix and a 4-D conv
kernel) for NUM_STEPS steps on loss = 0.5 * ||x||^2 + 1 with gradients x + noise_k, the
noise sequence fixed, so Polyak steps see a real loss. Run with ``-s`` to print the
max abs differences (``PARITY <name>: <diff>``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metaopt import features
from metaopt import mup
from metaopt import optimizers

NUM_STEPS = 60
NOISE = 0.3
TOL = 1e-10
SHAPES = {"scalar": (), "vector": (7,), "matrix": (5, 3), "conv": (3, 3, 2, 4)}


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  params = {k: rng.normal(size=s) for k, s in SHAPES.items()}
  noise = {k: rng.normal(size=(NUM_STEPS,) + s) * NOISE for k, s in SHAPES.items()}
  return params, noise


def _loss(params):
  return 0.5 * sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(params)) + 1.0


def _run(opt, params, noise):
  """Trajectory of the parameters (stacked over steps) under ``opt``."""
  params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
  noise = jax.tree.map(lambda n: jnp.asarray(n, jnp.float64), noise)

  @jax.jit
  def run(params, noise):
    def step(carry, noise_k):
      p, state = carry
      value = _loss(p)
      grads = jax.tree.map(lambda x, n: x + n, p, noise_k)
      updates, state = opt.update(grads, state, p, value=value)
      p = optax.apply_updates(p, updates)
      return (p, state), p

    (_, state), traj = jax.lax.scan(step, (params, opt.init(params)), noise)
    return traj, state

  return run(params, noise)


def _max_abs_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _check(name, ours, ref):
  params, noise = _problem()
  traj, _ = _run(ours, params, noise)
  ref_traj, _ = _run(ref, params, noise)
  assert jax.tree.leaves(traj)[0].dtype == jnp.float64
  diff = _max_abs_diff(traj, ref_traj)
  moved = _max_abs_diff(traj, jax.tree.map(lambda p: p[None], params))
  print(f"PARITY {name}: {diff:.3e} (params moved up to {moved:.2f})")
  assert moved > 1e-3, "the trajectory did not move: the test would prove nothing"
  assert diff < TOL
  return diff


def _alpha_schedule(alpha, t_alpha):
  return lambda count: features.ademamix_alpha(count, alpha, t_alpha)


def _b3_schedule(b1, b3, t_beta3):
  return lambda count: features.ademamix_beta3(count, b1, b3, t_beta3)


def _vector_roles(params):
  return jax.tree.map(lambda _: mup.vector_role(), params)


CASES = {
    "sgdm": lambda: (optimizers.sgdm(0.05, 0.9), optax.sgd(0.05, 0.9)),
    "nesterov": lambda: (optimizers.nesterov(0.05, 0.9),
                         optax.sgd(0.05, 0.9, nesterov=True)),
    "adamw": lambda: (optimizers.adamw(0.05, weight_decay=1e-2),
                      optax.adamw(0.05, weight_decay=1e-2)),
    "mu_adamw(all vector roles)": lambda: (
        optimizers.mu_adamw(0.05, _vector_roles(_problem()[0]), weight_decay=1e-2),
        optax.adamw(0.05, weight_decay=1e-2)),
    "mu_adamw(callable roles)": lambda: (
        optimizers.mu_adamw(0.05, _vector_roles, weight_decay=1e-2),
        optax.adamw(0.05, weight_decay=1e-2)),
    "lion": lambda: (optimizers.lion(0.01, weight_decay=0.1),
                     optax.lion(0.01, weight_decay=0.1)),
    "ademamix": lambda: (optimizers.ademamix(0.05, b3=0.99, weight_decay=1e-2),
                         optax.contrib.ademamix(0.05, b3=0.99, weight_decay=1e-2)),
    "ademamix(schedulers)": lambda: (
        optimizers.ademamix(0.05, b3=0.999, alpha=8.0, t_alpha=20, t_beta3=30),
        optax.contrib.ademamix(0.05, b3=_b3_schedule(0.9, 0.999, 30),
                               alpha=_alpha_schedule(8.0, 20))),
    "momo": lambda: (optimizers.momo(), optax.contrib.momo()),
    "momo(adapt_lower_bound)": lambda: (
        optimizers.momo(lower_bound=0.5, adapt_lower_bound=True),
        optax.contrib.momo(lower_bound=0.5, adapt_lower_bound=True)),
    "momo_adam": lambda: (optimizers.momo_adam(0.1), optax.contrib.momo_adam(0.1)),
    "momo_adam(adapt_lower_bound)": lambda: (
        optimizers.momo_adam(0.1, lower_bound=0.5, adapt_lower_bound=True),
        optax.contrib.momo_adam(0.1, lower_bound=0.5, adapt_lower_bound=True)),
    "schedule_free_adamw": lambda: (
        optimizers.schedule_free_adamw(0.05, weight_decay=1e-2),
        optax.contrib.schedule_free_adamw(0.05, weight_decay=1e-2)),
    "alr_smag(c=1)": lambda: (
        optimizers.alr_smag(0.1, beta=0.9, lower_bound=0.5),
        optax.chain(optax.trace(decay=0.9, nesterov=False),
                    optax.scale_by_polyak(f_min=0.5, max_learning_rate=0.1, eps=0.0),
                    optax.scale(-1.0))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_optax(x64, name):
  ours, ref = CASES[name]()
  _check(name, ours, ref)


def test_schedule_free_eval_params_match_optax(x64):
  params, noise = _problem()
  ours = optimizers.schedule_free_adamw(0.05)
  ref = optax.contrib.schedule_free_adamw(0.05)
  (traj, state), (ref_traj, ref_state) = _run(ours, params, noise), _run(ref, params, noise)
  last = jax.tree.map(lambda t: t[-1], traj)
  ref_last = jax.tree.map(lambda t: t[-1], ref_traj)
  diff = _max_abs_diff(optimizers.schedule_free_eval_params(state, last),
                       optax.contrib.schedule_free_eval_params(ref_state, ref_last))
  print(f"PARITY schedule_free_eval_params: {diff:.3e}")
  assert diff < TOL


# ----------------------------------------------------------------------------------
# Paper forms in NumPy (where optax deviates or has no such optimizer).


def _np_run(step_fn, state):
  """Runs ``step_fn(x, g, f, k, state) -> (x, state)`` on the flat problem."""
  params, noise = _problem()
  x = np.concatenate([np.ravel(params[k]) for k in sorted(SHAPES)])
  noise = np.concatenate([noise[k].reshape(NUM_STEPS, -1) for k in sorted(SHAPES)], 1)
  traj = []
  for k in range(NUM_STEPS):
    f = 0.5 * x @ x + 1.0
    x, state = step_fn(x, x + noise[k], f, k, state)
    traj.append(x)
  return np.stack(traj)


def _flat_traj(traj):
  return np.concatenate([np.asarray(traj[k]).reshape(NUM_STEPS, -1)
                         for k in sorted(SHAPES)], 1)


def _momo_numpy(alpha, beta, lam, f_star):
  """MoMo's proximal step; ``lam`` a scalar or a per-coordinate vector (a masked decay):
  x <- P (x - tau d), tau = min(alpha, [fbar - f* - gamma + <d, P x>]_+ / <d, P d>) with
  P = diag(1 / (1 + alpha lam)); for a scalar lam that is the paper's
  tau = min(alpha, [(1 + alpha lam)(fbar - f* - gamma) + <d, x>]_+ / ||d||^2)."""
  shrink = 1 + alpha * lam

  def step(x, g, f, k, s):
    d, fbar, gamma = s
    if k == 0:
      d, fbar, gamma = g, f, g @ x
    else:
      d = beta * d + (1 - beta) * g
      fbar = beta * fbar + (1 - beta) * f
      gamma = beta * gamma + (1 - beta) * (g @ x)
    h = fbar - f_star - gamma + d @ (x / shrink)
    tau = min(alpha, max(h, 0.0) / (d @ (d / shrink)))
    return (x - tau * d) / shrink, (d, fbar, gamma)
  return _np_run(step, (None, None, None))


def _momo_adam_numpy(alpha, b1, b2, eps, lam, f_star):
  """MoMo-Adam's proximal step, ``lam`` as in :func:`_momo_numpy` (d / D for d)."""
  shrink = 1 + alpha * lam

  def step(x, g, f, k, s):
    d, v, fbar, gamma = s
    t = k + 1
    d = b1 * d + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    fbar = b1 * fbar + (1 - b1) * f
    gamma = b1 * gamma + (1 - b1) * (g @ x)
    rho = 1 - b1**t
    big_d = np.sqrt(v / (1 - b2**t)) + eps
    h = fbar - rho * f_star - gamma + d @ (x / shrink)
    tau = min(alpha / rho, max(h, 0.0) / (d @ (d / big_d / shrink)))
    return (x - tau * d / big_d) / shrink, (d, v, fbar, gamma)
  return _np_run(step, (0.0, 0.0, 0.0, 0.0))


def _alr_smag_numpy(gamma_b, beta, f_star, c, lam):
  def step(x, g, f, k, d):
    del k
    d = beta * d + g
    tau = min(gamma_b, (f - f_star) / (c * (d @ d)))
    return x * (1 - lam * tau) - tau * d, d
  return _np_run(step, 0.0)


PAPER_CASES = {
    "momo(weight_decay=0.1) vs paper": lambda: (
        optimizers.momo(1.0, 0.9, 0.0, weight_decay=0.1), _momo_numpy(1.0, 0.9, 0.1, 0.0)),
    "momo_adam(weight_decay=0.1) vs paper": lambda: (
        optimizers.momo_adam(0.1, weight_decay=0.1),
        _momo_adam_numpy(0.1, 0.9, 0.999, 1e-8, 0.1, 0.0)),
    "alr_smag(weight_decay=0.1, c=2) vs paper": lambda: (
        optimizers.alr_smag(0.1, 0.9, 0.5, c=2.0, weight_decay=0.1),
        _alr_smag_numpy(0.1, 0.9, 0.5, 2.0, 0.1)),
    "alr_smag(weight_decay=0.1, c=1) vs paper": lambda: (
        optimizers.alr_smag(0.1, 0.9, 0.0, c=1.0, weight_decay=0.1),
        _alr_smag_numpy(0.1, 0.9, 0.0, 1.0, 0.1)),
    # Weight-decay masks: the same steps with a per-coordinate decay (0 off the mask).
    "momo(mask) vs diagonal decay": lambda: (
        optimizers.momo(1.0, 0.9, 0.0, weight_decay=0.5, mask=DECAYED),
        _momo_numpy(1.0, 0.9, _lam_vector(0.5), 0.0)),
    "momo_adam(mask) vs diagonal decay": lambda: (
        optimizers.momo_adam(0.1, weight_decay=0.5, mask=_ndim_mask),
        _momo_adam_numpy(0.1, 0.9, 0.999, 1e-8, _lam_vector(0.5), 0.0)),
    "alr_smag(mask) vs diagonal decay": lambda: (
        optimizers.alr_smag(0.1, 0.9, 0.5, c=2.0, weight_decay=0.5, mask=DECAYED),
        _alr_smag_numpy(0.1, 0.9, 0.5, 2.0, _lam_vector(0.5))),
}


@pytest.mark.parametrize("name", list(PAPER_CASES))
def test_parity_with_paper_numpy(x64, name):
  ours, ref = PAPER_CASES[name]()
  params, noise = _problem()
  traj, _ = _run(ours, params, noise)
  diff = float(np.max(np.abs(_flat_traj(traj) - ref)))
  print(f"PARITY {name}: {diff:.3e} (params moved up to "
        f"{np.max(np.abs(ref[-1] - ref[0])):.2f})")
  assert diff < TOL


def test_momo_weight_decay_differs_from_optax(x64):
  """The documented deviation is real: the paper's proximal step is not optax's."""
  params, noise = _problem()
  traj, _ = _run(optimizers.momo(weight_decay=0.1), params, noise)
  ref, _ = _run(optax.contrib.momo(weight_decay=0.1), params, noise)
  assert _max_abs_diff(traj, ref) > 1e-6


# ----------------------------------------------------------------------------------
# muP scaling of mu_adamw.


def _mlp_params(width, rng):
  return {"in": rng.normal(size=(8, width)).astype(np.float32),
          "hidden": rng.normal(size=(width, width)).astype(np.float32),
          "out": rng.normal(size=(width, 4)).astype(np.float32),
          "bias": rng.normal(size=(width,)).astype(np.float32)}


def test_mu_adamw_hidden_update_scales_as_one_over_width():
  base, lr = 64, 1e-2
  rms = {}
  for width in (64, 128, 256):
    rng = np.random.default_rng(width)
    params = _mlp_params(width, rng)
    roles = {"in": mup.input_role(8), "hidden": mup.hidden_role(width, base),
             "out": mup.output_role(width, base), "bias": mup.vector_role()}
    ours, plain = optimizers.mu_adamw(lr, roles), optimizers.adamw(lr)
    state, plain_state = ours.init(params), plain.init(params)
    for _ in range(3):
      grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
      u, state = ours.update(grads, state, params)
      v, plain_state = plain.update(grads, plain_state, params)
    for leaf in ("in", "out", "bias"):
      np.testing.assert_array_equal(u[leaf], v[leaf])
    np.testing.assert_allclose(u["hidden"], v["hidden"] * (base / width), rtol=1e-6)
    rms[width] = float(jnp.sqrt(jnp.mean(jnp.square(u["hidden"]))))
  print("mu_adamw hidden update RMS:", rms)
  for width in (128, 256):
    assert rms[width] * width / base == pytest.approx(rms[base], rel=0.05)


# ----------------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize("make", [optimizers.momo, optimizers.momo_adam,
                                  optimizers.alr_smag])
def test_loss_based_optimizers_require_value(make):
  opt = make()
  params = jnp.ones(3)
  with pytest.raises(ValueError, match="value=loss"):
    opt.update(params, opt.init(params), params)


@pytest.mark.parametrize("make", [
    lambda: optimizers.sgdm(-1.0), lambda: optimizers.adamw(b1=1.0),
    lambda: optimizers.lion(weight_decay=-1.0), lambda: optimizers.ademamix(1e-3, b3=1.5),
    lambda: optimizers.momo(beta=-0.1), lambda: optimizers.alr_smag(c=0.0),
    lambda: optimizers.schedule_free_adamw(b1=0.0)])
def test_out_of_range_hyperparameters_raise(make):
  with pytest.raises(ValueError, match="out of range"):
    make()


def test_mu_adamw_rejects_mismatched_roles():
  params = {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}
  opt = optimizers.mu_adamw(1e-3, {"w": mup.vector_role()})
  with pytest.raises(ValueError, match="roles do not match"):
    opt.init(params)


def test_schedule_free_warmup_starts_at_lr_over_warmup():
  """Step k (1-based) uses lr * min(1, k / warmup) for z, as the reference code does."""
  opt = optimizers.schedule_free_adamw(1.0, warmup_steps=5, eps=1e-12)
  params, grads = jnp.zeros(2), jnp.array([1.0, -2.0])
  state = opt.init(params)
  for k in (1, 2):
    z_prev = state.z
    _, state = opt.update(grads, state, params)
    # g / sqrt(v_hat) = sign(g) for a constant gradient (float32 bias correction).
    np.testing.assert_allclose(state.z - z_prev, -(k / 5) * jnp.sign(grads), rtol=1e-4)


# ----------------------------------------------------------------------------------
# Weight-decay masks (optax's ``mask=``: a tree of bools, a prefix of it, or a callable).

DECAYED = {"scalar": False, "vector": False, "matrix": True, "conv": True}


def _ndim_mask(params):
  return jax.tree.map(lambda x: jnp.ndim(x) > 1, params)


def _sgdw_ref(momentum, nesterov, mask):
  return optax.chain(optax.trace(decay=momentum, nesterov=nesterov),
                     optax.add_decayed_weights(0.1, mask),
                     optax.scale_by_learning_rate(0.05))


def _schedule_free_adamw_ref(mask):
  """optax.contrib.schedule_free_adamw as optax 0.2.8 builds it, with the mask added."""
  base = optax.chain(
      optax.scale_by_rms(decay=0.999, eps=1e-8, eps_in_sqrt=False, bias_correction=True),
      optax.add_decayed_weights(0.1, mask), optax.scale_by_learning_rate(0.05))
  return optax.contrib.schedule_free(base, learning_rate=0.05, b1=0.9)


MASK_CASES = {
    "adamw": lambda m: (optimizers.adamw(0.05, weight_decay=0.1, mask=m),
                        optax.adamw(0.05, weight_decay=0.1, mask=m)),
    "mu_adamw(all vector roles)": lambda m: (
        optimizers.mu_adamw(0.05, _vector_roles, weight_decay=0.1, mask=m),
        optax.adamw(0.05, weight_decay=0.1, mask=m)),
    "lion": lambda m: (optimizers.lion(0.01, weight_decay=0.5, mask=m),
                       optax.lion(0.01, weight_decay=0.5, mask=m)),
    "ademamix": lambda m: (optimizers.ademamix(0.05, b3=0.99, weight_decay=0.1, mask=m),
                           optax.contrib.ademamix(0.05, b3=0.99, weight_decay=0.1, mask=m)),
    "sgdm": lambda m: (optimizers.sgdm(0.05, 0.9, weight_decay=0.1, mask=m),
                       _sgdw_ref(0.9, False, m)),
    "nesterov": lambda m: (optimizers.nesterov(0.05, 0.9, weight_decay=0.1, mask=m),
                           _sgdw_ref(0.9, True, m)),
    "schedule_free_adamw": lambda m: (
        optimizers.schedule_free_adamw(0.05, weight_decay=0.1, mask=m),
        _schedule_free_adamw_ref(m)),
}


@pytest.mark.parametrize("mask", [DECAYED, _ndim_mask], ids=["tree", "callable"])
@pytest.mark.parametrize("name", list(MASK_CASES))
def test_mask_parity_with_optax(x64, name, mask):
  ours, ref = MASK_CASES[name](mask)
  _check(f"{name}(mask)", ours, ref)


# Optimizers whose update is computed leaf by leaf: a masked-off leaf's whole trajectory
# is the weight_decay=0 one, a decayed leaf's the unmasked one.
PER_LEAF_MASKED = {
    "adamw": lambda wd, m: optimizers.adamw(0.05, weight_decay=wd, mask=m),
    "lion": lambda wd, m: optimizers.lion(0.01, weight_decay=wd, mask=m),
    "sgdm": lambda wd, m: optimizers.sgdm(0.05, weight_decay=wd, mask=m),
    "cautious": lambda wd, m: optimizers.cautious(optax.scale_by_adam(), 0.05, wd, mask=m),
    "cautious_adamw": lambda wd, m: optimizers.cautious_adamw(0.05, weight_decay=wd, mask=m),
    "cautious_lion": lambda wd, m: optimizers.cautious_lion(0.01, weight_decay=wd, mask=m),
    "tam": lambda wd, m: optimizers.tam(0.05, weight_decay=wd, mask=m),
    "adatam": lambda wd, m: optimizers.adatam(0.05, weight_decay=wd, mask=m),
    "grams": lambda wd, m: optimizers.grams(0.05, weight_decay=wd, mask=m),
    "laprop": lambda wd, m: optimizers.laprop(0.05, weight_decay=wd, mask=m),
    "mars_adamw": lambda wd, m: optimizers.mars_adamw(0.05, weight_decay=wd, mask=m),
    "adan": lambda wd, m: optimizers.adan(0.05, weight_decay=wd, mask=m),
    "adamp": lambda wd, m: optimizers.adamp(0.05, weight_decay=wd, mask=m),
    "sgdp": lambda wd, m: optimizers.sgdp(0.05, weight_decay=wd, mask=m),
    # The conv kernel in the Muon part, the matrix (an input layer) in the AdamW part.
    "muon": lambda wd, m: optimizers.muon(
        0.02, weight_decay=wd, adam_weight_decay=wd, mask=m,
        labels={"scalar": "vector", "vector": "vector", "matrix": "input", "conv": "hidden"}),
}


@pytest.mark.parametrize("name", list(PER_LEAF_MASKED))
def test_masked_leaves_follow_the_undecayed_run(x64, name):
  make = PER_LEAF_MASKED[name]
  params, noise = _problem()
  masked, _ = _run(make(0.5, DECAYED), params, noise)
  undecayed, _ = _run(make(0.0, None), params, noise)
  decayed, _ = _run(make(0.5, None), params, noise)
  for leaf, on in DECAYED.items():
    np.testing.assert_array_equal(masked[leaf], (decayed if on else undecayed)[leaf],
                                  err_msg=f"{name}: leaf {leaf} (decayed={on})")
    if on:  # the decay is visible, so the comparison proves something
      assert _max_abs_diff(decayed[leaf], undecayed[leaf]) > 1e-4


def test_alr_smag_masked_step_is_the_undecayed_step_off_the_mask(x64):
  """ALR-SMAG's tau does not depend on the decay: masks act leaf by leaf on each step."""
  params, noise = _problem()
  params = jax.tree.map(jnp.asarray, params)
  grads = jax.tree.map(lambda p, n: p + n[0], params, noise)
  value = _loss(params)

  def step(wd, mask):
    opt = optimizers.alr_smag(0.1, 0.9, 0.5, weight_decay=wd, mask=mask)
    return opt.update(grads, opt.init(params), params, value=value)[0]

  masked, undecayed, decayed = step(0.5, DECAYED), step(0.0, None), step(0.5, None)
  for leaf, on in DECAYED.items():
    np.testing.assert_array_equal(masked[leaf], (decayed if on else undecayed)[leaf])


def _lam_vector(lam):
  """Per-coordinate weight decay of the flat problem: lam where DECAYED, else 0."""
  return np.concatenate([np.full(int(np.prod(SHAPES[k])), lam if DECAYED[k] else 0.0)
                         for k in sorted(SHAPES)])


@pytest.mark.parametrize("make", [optimizers.momo, optimizers.momo_adam])
@pytest.mark.parametrize("adapt", [False, True])
def test_polyak_all_false_mask_equals_no_decay_and_all_true_equals_no_mask(x64, make,
                                                                          adapt):
  params, noise = _problem()
  kw = dict(lower_bound=0.5, adapt_lower_bound=adapt)
  none_decayed = jax.tree.map(lambda _: False, DECAYED)
  all_decayed = jax.tree.map(lambda _: True, DECAYED)
  off, _ = _run(make(weight_decay=0.5, mask=none_decayed, **kw), params, noise)
  no_decay, _ = _run(make(weight_decay=0.0, **kw), params, noise)
  on, _ = _run(make(weight_decay=0.5, mask=all_decayed, **kw), params, noise)
  unmasked, _ = _run(make(weight_decay=0.5, **kw), params, noise)
  assert _max_abs_diff(off, no_decay) < TOL
  assert _max_abs_diff(on, unmasked) < TOL
  assert _max_abs_diff(unmasked, no_decay) > 1e-4


def test_prefix_and_callable_masks_select_leaves_as_optax_masked_does():
  from metaopt.optimizers import _factory  # pylint: disable=g-import-not-at-top
  params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
            "norm": {"scale": jnp.ones(2)}, "head": jnp.ones((2, 4))}
  prefix = {"dense": True, "norm": False, "head": True}
  callable_mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
  for mask in (prefix, callable_mask, None):
    probe = optax.masked(optax.add_decayed_weights(1.0), mask) if mask is not None else \
        optax.add_decayed_weights(1.0)
    zeros = jax.tree.map(jnp.zeros_like, params)
    selected, _ = probe.update(zeros, probe.init(params), params)
    expected = jax.tree.map(lambda u: bool(jnp.all(u == 1.0)), selected)
    assert _factory.decayed_leaves(mask, params) == expected
    ours, ref = optimizers.adamw(0.1, weight_decay=0.5, mask=mask), optax.adamw(
        0.1, weight_decay=0.5, mask=mask)
    u, _ = ours.update(params, ours.init(params), params)
    v, _ = ref.update(params, ref.init(params), params)
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(v)):
      np.testing.assert_allclose(a, b, rtol=1e-6)


def test_mask_is_a_static_argument_of_inject_hyperparams():
  params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
  ours, ref = (optax.inject_hyperparams(make, static_args=("mask",))(
      learning_rate=0.1, weight_decay=0.5, mask=_ndim_mask)
                for make in (optimizers.adamw, optax.adamw))
  u, _ = jax.jit(ours.update)(params, ours.init(params), params)
  v, _ = jax.jit(ref.update)(params, ref.init(params), params)
  for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(v)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
