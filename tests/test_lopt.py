"""The learned optimizer: exact subsumption, muP, drop-in use, bad input."""

import inspect
import warnings

import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metaopt
from metaopt import mup
from metaopt import optimizers
from metaopt.lopt import CLASSICAL, LearnedOptimizer


class _FlaxMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(16)(x))
    return nn.Dense(3)(x)


def _haiku_model(x):
  x = hk.Conv2D(4, 3)(x.reshape(x.shape[0], 1, 5, 1))
  return hk.Linear(3, with_bias=False)(x.reshape(x.shape[0], -1))


def _models(dtype):
  """A Flax MLP and a Haiku conv model in one tree, with a squared-error loss."""
  haiku = hk.without_apply_rng(hk.transform(_haiku_model))
  flax_mlp = _FlaxMLP()
  x = jax.random.normal(jax.random.key(1), (8, 5), dtype)
  y = jax.random.normal(jax.random.key(2), (8, 3), dtype)
  params = {"flax": flax_mlp.init(jax.random.key(3), x)["params"],
            "haiku": haiku.init(jax.random.key(4), x),
            "scale": jnp.ones([], dtype)}
  params = jax.tree.map(lambda a: a.astype(dtype), params)

  def loss(p, key):
    xb = x + 0.1 * jax.random.normal(key, x.shape, dtype)
    out = p["scale"] * (flax_mlp.apply({"params": p["flax"]}, xb) + haiku.apply(p["haiku"], xb))
    return 0.5 * jnp.mean((out - y) ** 2) + 0.1

  return params, loss


def _default_kwargs(name):
  param = inspect.signature(getattr(optimizers, name)).parameters["learning_rate"]
  return {} if param.default is not inspect.Parameter.empty else {"learning_rate": 1e-2}


def _run_both(ref, lo, params, loss, steps, with_value):
  """Trains with ``ref``; feeds the same (params, grads, loss) to ``lo``; returns updates."""

  def step(carry, key):
    p, s_ref, s_lo = carry
    value, grads = jax.value_and_grad(loss)(p, key)
    kw = {"value": value} if with_value else {}
    u_ref, s_ref = ref.update(grads, s_ref, p, **kw)
    u_lo, s_lo = lo.update(grads, s_lo, p, **kw)
    return (optax.apply_updates(p, u_ref), s_ref, s_lo), (u_ref, u_lo)

  keys = jax.random.split(jax.random.key(0), steps)
  _, (u_ref, u_lo) = jax.jit(lambda c: jax.lax.scan(step, c, keys))(
      (params, ref.init(params), lo.init(params)))
  return u_ref, u_lo


@pytest.mark.parametrize("name", sorted(CLASSICAL))
def test_from_classical_equals_optimizer_float64(name, x64):
  del x64
  params, loss = _models(jnp.float64)
  kwargs = _default_kwargs(name)
  ref = getattr(optimizers, name)(**kwargs)
  lo = LearnedOptimizer.from_classical(name, **kwargs).as_optax()
  u_ref, u_lo = _run_both(ref, lo, params, loss, 100, name == "momo_adam")
  for a, b in zip(jax.tree.leaves(u_ref), jax.tree.leaves(u_lo)):
    assert a.dtype == jnp.float64
    np.testing.assert_allclose(b, a, rtol=1e-8, atol=1e-14)
  assert float(jnp.max(jnp.abs(jax.tree.leaves(u_ref)[0]))) > 0  # really trained


def _small_models():
  """One Flax Dense and one Haiku Linear: a cheap tree for the float32 check."""
  full, full_loss = _models(jnp.float32)
  params = {"flax": {"Dense_1": full["flax"]["Dense_1"]},
            "haiku": {"linear": full["haiku"]["linear"]}, "scale": full["scale"]}

  def small_loss(p, key):
    merged = {"flax": {**full["flax"], **p["flax"]}, "haiku": {**full["haiku"], **p["haiku"]},
              "scale": p["scale"]}
    return full_loss(merged, key)

  return params, small_loss


@pytest.mark.parametrize("name", sorted(CLASSICAL))
def test_from_classical_equals_optimizer_float32_one_step(name):
  params, loss = _small_models()
  kwargs = _default_kwargs(name)
  ref = getattr(optimizers, name)(**kwargs)
  lo = LearnedOptimizer.from_classical(name, **kwargs).as_optax()
  u_ref, u_lo = _run_both(ref, lo, params, loss, 1, name == "momo_adam")
  for a, b in zip(jax.tree.leaves(u_ref), jax.tree.leaves(u_lo)):
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(a))) + 1e-30)


def test_from_classical_nondefault_hyperparameters(x64):
  del x64
  params, loss = _models(jnp.float64)
  hp = dict(learning_rate=3e-3, b1=0.8, b2=0.99, eps=1e-6, weight_decay=1e-2)
  u_ref, u_lo = _run_both(optimizers.adamw(**hp),
                          LearnedOptimizer.from_classical("adamw", **hp).as_optax(),
                          params, loss, 30, False)
  for a, b in zip(jax.tree.leaves(u_ref), jax.tree.leaves(u_lo)):
    np.testing.assert_allclose(b, a, rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("name, hparams, bad", [
    ("adamw", {"eps_root": 1e-8}, "eps_root"),
    ("ademamix", {"learning_rate": 1e-3, "t_alpha": 100}, "t_alpha"),
    ("momo_adam", {"weight_decay": 0.1}, "weight_decay"),
    ("sgdm", {"learning_rate": 0.1, "nesterov": True}, "nesterov"),
    ("adamw", {"learning_rate": optax.constant_schedule(1e-3)}, "schedule"),
    ("adamw", {"betas": 0.9}, "betas"),
    ("adan", {}, "adan"),
])
def test_from_classical_rejects_unrepresentable(name, hparams, bad):
  with pytest.raises(ValueError, match=bad):
    LearnedOptimizer.from_classical(name, **hparams)


def test_mup_from_classical_equals_mu_adamw(x64):
  del x64
  params, loss = _models(jnp.float64)
  roles = mup.roles_from_labels(
      params, lambda p: jax.tree.map(lambda a: "hidden" if a.ndim == 2 else "vector", p),
      base_fan_in=4)
  ref = optimizers.mu_adamw(1e-3, roles)
  lo = LearnedOptimizer.from_classical("adamw", mup=True).as_optax(roles=roles)
  u_ref, u_lo = _run_both(ref, lo, params, loss, 20, False)
  for a, b in zip(jax.tree.leaves(u_ref), jax.tree.leaves(u_lo)):
    np.testing.assert_allclose(b, a, rtol=1e-8, atol=1e-14)


def _hidden_update_rms(width, sp):
  """RMS of a random-theta LO's update on the hidden kernel of a 3-layer MLP."""
  lo = LearnedOptimizer.random(jax.random.key(7), output_scale=0.05)
  keys = jax.random.split(jax.random.key(width), 3)
  params = {"in": jax.random.normal(keys[0], (8, width)) / np.sqrt(8),
            "hidden": jax.random.normal(keys[1], (width, width)) / np.sqrt(width),
            "out": jnp.zeros((width, 4))}
  roles = {"in": mup.input_role(8), "hidden": mup.hidden_role(width, 64),
           "out": mup.output_role(width, 64)}
  opt = lo.as_optax(roles=roles, sp=sp)
  grads = jax.tree.map(lambda p: jax.random.normal(keys[2], p.shape), params)

  update = jax.jit(opt.update)  # one update compiled per width, not three unrolled
  state = jax.jit(opt.init)(params)
  for _ in range(3):
    updates, state = update(grads, state, params)
  return float(jnp.sqrt(jnp.mean(updates["hidden"] ** 2)))


def test_mup_hidden_update_scales_as_one_over_width():
  rms = {w: _hidden_update_rms(w, sp=False) for w in (64, 128, 256)}
  for w in (128, 256):
    np.testing.assert_allclose(rms[w] * w / 64, rms[64], rtol=0.05)
  sp = {w: _hidden_update_rms(w, sp=True) for w in (64, 256)}
  assert sp[256] / sp[64] > 0.8  # SP: no 1/width shrinkage


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("with_value", [False, True])
def test_random_lo_finite_on_scalars_vectors_conv_kernels(dtype, with_value):
  lo = LearnedOptimizer.random(jax.random.key(0), output_scale=0.1)
  params = {"scalar": jnp.asarray(0.5, dtype), "bias": jnp.ones((4,), dtype),
            "dense": jnp.ones((3, 4), dtype),
            "conv": jax.random.normal(jax.random.key(1), (3, 3, 2, 4)).astype(dtype)}
  opt = lo.as_optax(num_steps=None if with_value else 50)
  state = opt.init(params)
  assert all(l.dtype in (jnp.float32, jnp.int32) for l in jax.tree.leaves(state))

  @jax.jit
  def step(params, state, key):
    grads = jax.tree.map(lambda p: jax.random.normal(key, p.shape, p.dtype), params)
    kw = {"value": jnp.asarray(1.5)} if with_value else {}
    updates, state = opt.update(grads, state, params, **kw)
    return optax.apply_updates(params, updates), state, updates

  for i in range(5):
    params, state, updates = step(params, state, jax.random.key(i))
  for p, u in zip(jax.tree.leaves(params), jax.tree.leaves(updates)):
    assert u.dtype == dtype and p.dtype == dtype
    assert bool(jnp.all(jnp.isfinite(u.astype(jnp.float32))))
  assert any(float(jnp.max(jnp.abs(u.astype(jnp.float32)))) > 0 for u in jax.tree.leaves(updates))


def test_composes_with_clip_multisteps_masked():
  lo = LearnedOptimizer.from_classical("adamw").as_optax()
  params = {"w": jnp.ones((3, 2)), "b": jnp.ones((2,)), "frozen": jnp.ones((2,))}
  grads = jax.tree.map(jnp.ones_like, params)
  opt = optax.chain(optax.clip_by_global_norm(1.0),
                    optax.masked(lo, {"w": True, "b": True, "frozen": False}))
  state = opt.init(params)
  updates, state = jax.jit(opt.update)(grads, state, params)
  np.testing.assert_array_equal(updates["frozen"], grads["frozen"] / np.sqrt(10))  # only clipped
  assert float(jnp.max(jnp.abs(updates["w"]))) > 0

  multi = optax.MultiSteps(lo, every_k_schedule=2)
  state = multi.init(params)
  update = jax.jit(multi.update)
  u1, state = update(grads, state, params)
  u2, state = update(grads, state, params)
  assert float(jnp.max(jnp.abs(u1["w"]))) == 0 and float(jnp.max(jnp.abs(u2["w"]))) > 0


def test_jit_with_donated_buffers_and_no_params_in_state():
  lo = LearnedOptimizer.random(jax.random.key(0), output_scale=0.1)
  opt = lo.as_optax(num_steps=10)
  params = {"w": jnp.full((4, 4), 0.123456), "b": jnp.zeros((4,))}
  state = opt.init(params)
  leaves = [np.asarray(l) for l in jax.tree.leaves(state)]
  assert not any(l.shape == (4, 4) and np.all(l == 0.123456) for l in leaves)

  @jax.jit
  def step(params, state):
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = opt.update(grads, state, params, value=1.0)
    return optax.apply_updates(params, updates), state

  step_donated = jax.jit(step, donate_argnums=(0, 1))
  p1, s1 = step(params, state)
  p2, s2 = step_donated(jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, state))
  np.testing.assert_array_equal(p1["w"], p2["w"])


@pytest.mark.parametrize("switches", [{}, {"muon": True, "step_size_features": True}])
@pytest.mark.parametrize("large", [False, True])
def test_donating_params_and_a_fresh_state_matches_the_undonated_step(switches, large):
  """Every state leaf from ``init`` is its own buffer, so a step may donate the state
  ``init`` returned (XLA refuses to donate one buffer passed twice)."""
  lo = LearnedOptimizer.random(jax.random.key(0), output_scale=0.1).extended(**switches)
  labels = {"w": "hidden", "b": "vector", "o": "output"}
  opt = lo.with_config(muon_beta=0.5).as_optax(num_steps=10, labels=labels)
  params = {"w": jnp.full((300, 300) if large else (4, 4), 0.5), "b": jnp.zeros((4,)),
            "o": jnp.linspace(-1.0, 1.0, 8).reshape(4, 2)}

  def step(params, state):
    grads = jax.tree.map(lambda p: jnp.cos(p) + 0.1, params)
    updates, state = opt.update(grads, state, params, value=1.0)
    return optax.apply_updates(params, updates), state

  plain, donating = jax.jit(step), jax.jit(step, donate_argnums=(0, 1))
  p1, s1 = params, opt.init(params)
  p2, s2 = jax.tree.map(jnp.copy, params), opt.init(params)
  for _ in range(2):
    p1, s1 = plain(p1, s1)
    p2, s2 = donating(p2, s2)
  for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("wrap", ["masked", "multi_transform"])
def test_an_empty_partition_gives_empty_updates_as_optax_does(wrap):
  """Every leaf masked out (or a multi_transform label with no leaves): the LO sees an
  empty tree and, like optax.adam there, returns empty updates and counts the step."""
  lo = LearnedOptimizer.random(jax.random.key(0), output_scale=0.1).as_optax(num_steps=5)
  params = {"w": jnp.ones((3, 2)), "b": jnp.ones((2,))}
  grads = jax.tree.map(lambda p: 0.5 * p, params)
  if wrap == "masked":
    make = lambda inner: optax.masked(inner, {"w": False, "b": False})
  else:
    make = lambda inner: optax.multi_transform({"lo": inner, "sgd": optax.sgd(0.1)},
                                               {"w": "sgd", "b": "sgd"})
  opt, ref = make(lo), make(optax.adam(0.1))
  updates, state = jax.jit(opt.update)(grads, opt.init(params), params, value=1.0)
  ref_updates, _ = ref.update(grads, ref.init(params), params)
  for u, r in zip(jax.tree.leaves(updates), jax.tree.leaves(ref_updates)):
    np.testing.assert_array_equal(u, r)
  counts = [l for l in jax.tree.leaves(state) if jnp.result_type(l) == jnp.int32]
  assert [int(c) for c in counts][:1] == [1], counts


@pytest.mark.parametrize("roles_from", ["inferred", "labels", "base_params"])
def test_a_zero_size_leaf_gets_zero_size_updates(roles_from):
  """A (0, 4) leaf has no fan-in: it takes the vector role (nothing to scale), its
  update is empty and the other leaves' updates are those of the tree without it."""
  lo = LearnedOptimizer.random(jax.random.key(0), output_scale=0.1).extended(muon=True)
  params = {"a": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.ones((4,)),
            "c": jnp.linspace(0.5, 1.5, 8).reshape(4, 2)}
  labels = {"a": "input", "b": "vector", "c": "output"}
  kwargs = {"inferred": {}, "labels": {"labels": labels},
            "base_params": {"base_params": params}}[roles_from]
  ref_opt = lo.as_optax(num_steps=5, **{k: v for k, v in kwargs.items()})
  ref_updates, _ = ref_opt.update(params, ref_opt.init(params), params, value=1.0)

  with_empty = {**params, "empty": jnp.ones((0, 4))}
  kwargs = {"inferred": {}, "labels": {"labels": {**labels, "empty": "hidden"}},
            "base_params": {"base_params": with_empty}}[roles_from]
  opt = lo.as_optax(num_steps=5, **kwargs)
  updates, state = jax.jit(opt.update)(with_empty, opt.init(with_empty), with_empty,
                                       value=1.0)
  assert updates["empty"].shape == (0, 4)
  for name in params:
    np.testing.assert_allclose(updates[name], ref_updates[name], rtol=1e-6, atol=0)
  assert int(state.count) == 1


def test_bad_input_errors_name_the_leaf():
  lo = LearnedOptimizer.from_classical("adamw")
  params = {"a": jnp.ones((2, 3)), "b": jnp.ones((3,))}
  opt = lo.as_optax()
  state = opt.init(params)
  with pytest.raises(ValueError, match=r"\['c'\]"):
    opt.update({"a": jnp.ones((2, 3)), "c": jnp.ones((3,))}, state,
               {"a": jnp.ones((2, 3)), "c": jnp.ones((3,))})
  with pytest.raises(ValueError, match=r"\['b'\].*shape"):
    opt.update({"a": jnp.ones((2, 3)), "b": jnp.ones((4,))}, state,
               {"a": jnp.ones((2, 3)), "b": jnp.ones((4,))})
  with pytest.raises(ValueError, match=r"\['i'\].*int32"):
    opt.init({"a": jnp.ones((2,)), "i": jnp.ones((2,), jnp.int32)})
  with pytest.raises(ValueError, match="num_steps"):
    lo.as_optax(num_steps=0)
  with pytest.raises(ValueError, match="num_steps"):
    lo.as_optax(num_steps=-5)
  with pytest.raises(ValueError, match="parameters"):
    opt.update(params, state)
  with pytest.raises(ValueError, match="roles do not match"):
    LearnedOptimizer.from_classical("adamw", mup=True).as_optax(
        roles={"a": mup.vector_role()}).init(params)
  with pytest.raises(ValueError, match=r"\['b'\].*'middle'"):
    LearnedOptimizer.from_classical("adamw", mup=True).as_optax(
        labels={"a": "hidden", "b": "middle"}).init(params)


def test_large_update_memory_is_bounded():
  """A 1e7-parameter update needs well under 2 GB of temporary memory."""
  lo = LearnedOptimizer.random(jax.random.key(0), output_scale=0.1)
  opt = lo.as_optax(num_steps=100)
  params = {"w": jax.ShapeDtypeStruct((2500, 4000), jnp.float32),
            "b": jax.ShapeDtypeStruct((4000,), jnp.float32)}
  state = jax.eval_shape(opt.init, params)
  compiled = jax.jit(lambda g, s, p: opt.update(g, s, p, value=1.0),
                     donate_argnums=(1,)).lower(params, state, params).compile()
  stats = compiled.memory_analysis()
  if stats is None:
    pytest.skip("this backend reports no memory analysis")
  assert stats.temp_size_in_bytes < 2 * 2**30, stats


class _Transformer(nn.Module):

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(50, 32)(tokens)
    x = x + nn.MultiHeadDotProductAttention(num_heads=4, name="attention")(x, x)
    x = x + nn.Dense(32, name="mlp")(nn.LayerNorm()(x))
    return nn.Dense(50, name="head")(x)


class _Conv(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


class _Deep(nn.Module):

  @nn.compact
  def __call__(self, x):
    for _ in range(11):
      x = nn.relu(nn.Dense(32)(x))
    return nn.Dense(10)(x)


def _kinds(roles):
  flat = jax.tree_util.tree_flatten_with_path(roles, is_leaf=mup.is_role)[0]
  return {jax.tree_util.keystr(p): (r.kind, r.fan_in) for p, r in flat}


def test_role_fallback_flax_deep_mlp_natural_order():
  params = _Deep().init(jax.random.key(0), jnp.ones((1, 6)))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    kinds = _kinds(mup.infer_roles(params))
  expected = {f"['params']['Dense_{i}']['kernel']": ("hidden", 32) for i in range(1, 11)}
  expected["['params']['Dense_0']['kernel']"] = ("input", 6)
  expected["['params']['Dense_11']['kernel']"] = ("output", 32)
  for i in range(12):
    expected[f"['params']['Dense_{i}']['bias']"] = ("vector", 1)
  assert kinds == expected


def test_role_fallback_conv_and_transformer():
  # Shapes are all infer_roles reads: eval_shape skips running the inits eagerly.
  conv = _kinds(mup.infer_roles(jax.eval_shape(_Conv().init, jax.random.key(0),
                                               jnp.ones((1, 6, 6, 3)))))
  assert conv["['params']['Conv_0']['kernel']"] == ("input", 27)
  assert conv["['params']['Conv_1']['kernel']"] == ("hidden", 72)
  assert conv["['params']['Dense_0']['kernel']"] == ("output", 576)

  # Eager init: a jitted or eval_shape'd init returns its dicts key-sorted, and the
  # fallback reads the layer order from insertion order (the names here are not Dense_i).
  tr = _kinds(mup.infer_roles(_Transformer().init(jax.random.key(0), jnp.ones((1, 5), int))))
  assert tr["['params']['Embed_0']['embedding']"] == ("input", 50)
  for proj in ("query", "key", "value"):
    assert tr[f"['params']['attention']['{proj}']['kernel']"] == ("hidden", 32)
  assert tr["['params']['attention']['out']['kernel']"] == ("hidden", 32)
  assert tr["['params']['mlp']['kernel']"] == ("hidden", 32)
  assert tr["['params']['head']['kernel']"] == ("output", 32)
  assert tr["['params']['LayerNorm_0']['scale']"] == ("vector", 1)


def test_role_fallback_haiku_and_overrides():
  model = hk.without_apply_rng(hk.transform(
      lambda x: hk.nets.MLP([16, 16, 16, 4])(x)))
  params = model.init(jax.random.key(0), jnp.ones((1, 3)))
  kinds = _kinds(mup.infer_roles(params))
  assert kinds["['mlp/~/linear_0']['w']"] == ("input", 3)
  assert kinds["['mlp/~/linear_1']['w']"] == ("hidden", 16)
  assert kinds["['mlp/~/linear_3']['w']"] == ("output", 16)
  # Explicit labels and base models override the fallback.
  labels = jax.tree.map(lambda _: "vector", params)
  assert set(k for k, _ in _kinds(mup.roles_from_labels(params, labels)).values()) == {"vector"}
  wide = model.init(jax.random.key(0), jnp.ones((1, 3)))
  base = hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP([8, 8, 8, 4])(x))).init(
      jax.random.key(0), jnp.ones((1, 3)))
  from_base = _kinds(mup.roles_from_base(wide, base))
  assert from_base["['mlp/~/linear_0']['w']"] == ("input", 3)
  assert from_base["['mlp/~/linear_1']['w']"] == ("hidden", 16)
  assert from_base["['mlp/~/linear_3']['w']"] == ("output", 16)


def test_role_fallback_warns_when_unsure():
  with pytest.warns(mup.RoleInferenceWarning, match="weight matrices"):
    mup.infer_roles({"w": jnp.ones((3, 4)), "b": jnp.ones((4,))})
  with pytest.warns(mup.RoleInferenceWarning, match="widens"):
    mup.infer_roles({"a": jnp.ones((3, 4)), "z": jnp.ones((4, 40))})


def test_value_changes_updates_only_through_polyak_features():
  """Without value the Polyak features are neutral; with value they are used."""
  lo = LearnedOptimizer.random(jax.random.key(3), output_scale=0.5)
  opt = lo.as_optax()
  params = {"w": jnp.ones((4, 3))}
  grads = {"w": jnp.linspace(-1, 1, 12).reshape(4, 3)}
  state = opt.init(params)
  u_none, _ = opt.update(grads, state, params)
  u_val, _ = opt.update(grads, state, params, value=jnp.asarray(0.3))
  assert bool(jnp.all(jnp.isfinite(u_none["w"]))) and bool(jnp.all(jnp.isfinite(u_val["w"])))
  assert not np.allclose(u_none["w"], u_val["w"])


def test_pretrained_unknown_name_lists_available():
  with pytest.raises(ValueError, match="no released learned optimizer named 'nope'"):
    metaopt.pretrained("nope")


def _theta_with(lo, **entries):
  theta = jax.tree.map(jnp.zeros_like, lo.theta)
  for name, (index, value) in entries.items():
    theta[name] = theta[name].at[index].set(value)
  return theta


def test_mlp_magnitude_is_bounded_by_max_log_step():
  """However large the MLP's log-magnitude output, a step grows by at most e^max_log_step."""
  adam = LearnedOptimizer.from_classical("adamw", weight_decay=0.0)
  k = metaopt.lopt.CANDIDATE_NAMES.index("adam")
  lo = adam.with_theta(_theta_with(adam, mix=(k, 1.0), b2=(1, 1e4)))
  lo = lo.with_theta({**lo.theta, "log_lr": adam.theta["log_lr"]})
  params = {"w": jnp.ones((5, 3))}
  grads = {"w": jnp.linspace(-1, 1, 15).reshape(5, 3)}
  u_adam, _ = adam.as_optax(sp=True).update(grads, adam.as_optax(sp=True).init(params), params)
  u_big, _ = lo.as_optax(sp=True).update(grads, lo.as_optax(sp=True).init(params), params)
  np.testing.assert_allclose(u_big["w"], u_adam["w"] * np.exp(lo.config.max_log_step),
                             rtol=1e-5)


def test_normalized_features_are_clipped():
  """One huge gradient entry reaches the MLP as feature_clip, not as sqrt(size)."""
  base = LearnedOptimizer.random(jax.random.key(0))
  i = metaopt.lopt.FEATURE_NAMES.index("grad")
  theta = _theta_with(base, w1=((i, 0), 1.0), w2=((0, 0), 1.0))  # d = relu(grad feature)
  lo = base.with_theta(theta)
  g = jnp.full((100, 100), 1e-3).at[3, 7].set(1e3)
  params = {"w": jnp.zeros((100, 100))}
  opt = lo.as_optax(sp=True)
  u, _ = opt.update({"w": g}, opt.init(params), params)
  assert float(u["w"][3, 7]) == pytest.approx(-lo.config.feature_clip, rel=1e-6)
  assert float(jnp.max(jnp.abs(u["w"]))) == pytest.approx(lo.config.feature_clip, rel=1e-6)


def _updates_side_by_side(opts, params, steps):
  """Each optimizer's update of ``params["w"]`` at steps 1..steps on the same gradients
  (params held fixed, so every state sees the same inputs), and the final states."""
  states, per_step = [o.init(params) for o in opts], []
  for t in range(1, steps + 1):
    grads = {"w": jnp.sin(t * params["w"] + 0.3)}
    out = [o.update(grads, s, params) for o, s in zip(opts, states)]
    states = [s for _, s in out]
    per_step.append([x["w"] for x, _ in out])
  return per_step, states


def test_linear_horizon_decay_scales_updates_only_when_num_steps_is_known():
  """horizon_decay="linear": update_t = (1 - (t-1)/N) * the undecayed update (same
  state); without num_steps nothing changes."""
  plain = LearnedOptimizer.random(jax.random.key(1), output_scale=0.3)
  decayed = plain.with_config(horizon_decay="linear")
  params = {"w": jnp.linspace(-1, 1, 12).reshape(4, 3)}
  n = 8
  opts = [plain.as_optax(num_steps=n, sp=True), decayed.as_optax(num_steps=n, sp=True),
          plain.as_optax(sp=True), decayed.as_optax(sp=True)]
  for t, u in enumerate(_updates_side_by_side(opts, params, 4)[0], 1):
    np.testing.assert_allclose(u[1], (1 - (t - 1) / n) * u[0], rtol=1e-5, atol=1e-12)
    np.testing.assert_array_equal(u[3], u[2])
    assert float(jnp.max(jnp.abs(u[2]))) > 0
  with pytest.raises(ValueError, match="horizon_decay='cosine'"):
    plain.with_config(horizon_decay="cosine")
  with pytest.raises(ValueError, match="changes theta's shapes"):
    plain.with_config(hidden_size=4)


def test_warmup_ramps_updates_over_its_fraction_of_num_steps_on_top_of_the_decay():
  """warmup_fraction=w: update_t = min(1, t / (w N)) * the unwarmed update (same state:
  the state does not depend on the step size), with the linear decay as well; without
  num_steps nothing changes; the default writes no field (old artifacts read alike)."""
  decayed = LearnedOptimizer.random(jax.random.key(1), output_scale=0.3).with_config(
      horizon_decay="linear")
  warmed = decayed.with_config(warmup_fraction=0.4)
  params = {"w": jnp.linspace(-1, 1, 12).reshape(4, 3)}
  n = 10  # warmup over 4 steps
  opts = [decayed.as_optax(num_steps=n, sp=True), warmed.as_optax(num_steps=n, sp=True),
          decayed.as_optax(sp=True), warmed.as_optax(sp=True)]
  for t, u in enumerate(_updates_side_by_side(opts, params, 6)[0], 1):
    np.testing.assert_allclose(u[1], min(1.0, t / 4) * u[0], rtol=1e-5, atol=1e-12)
    np.testing.assert_array_equal(u[3], u[2])
    assert float(jnp.max(jnp.abs(u[0]))) > 0
  assert "warmup_fraction" not in decayed.config.to_dict()
  assert metaopt.lopt.LOConfig.from_dict(warmed.config.to_dict()) == warmed.config
  for bad in (1.0, -0.1):
    with pytest.raises(ValueError, match=f"warmup_fraction={bad}"):
      decayed.with_config(warmup_fraction=bad)


def test_linear_horizon_decay_holds_the_last_step_size_past_num_steps():
  """Past num_steps the decayed update stays at 1/num_steps of the undecayed one (the
  last scheduled step's size) instead of dropping to exactly 0 and freezing training
  silently (e.g. when num_steps was given in epochs)."""
  plain = LearnedOptimizer.random(jax.random.key(1), output_scale=0.3)
  decayed = plain.with_config(horizon_decay="linear")
  params = {"w": jnp.linspace(-1, 1, 12).reshape(4, 3)}
  n = 3
  opts = [plain.as_optax(num_steps=n, sp=True), decayed.as_optax(num_steps=n, sp=True)]
  per_step, states = _updates_side_by_side(opts, params, 7)
  for t, u in enumerate(per_step, 1):
    factor = max(1 - (t - 1) / n, 1 / n)
    np.testing.assert_allclose(u[1], factor * u[0], rtol=1e-5, atol=1e-12)
    assert float(jnp.max(jnp.abs(u[1]))) > 0, t
  assert int(states[1].count) == 7 > n  # how a user sees the horizon was passed


def _nonfinite_problem():
  lo = LearnedOptimizer.random(jax.random.key(5), output_scale=0.3)
  params = {"w": jnp.linspace(-1, 1, 12).reshape(4, 3), "b": jnp.full((3,), 0.5)}
  return lo, params


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("with_value", [False, True])
def test_nonfinite_gradient_step_is_skipped_and_counted(bad, with_value):
  """One NaN/inf entry in one leaf: zero updates, state bitwise unchanged apart from
  num_nonfinite, and training continues with finite gradients as if the step never
  happened (before the fix one NaN poisoned every later update)."""
  lo, params = _nonfinite_problem()
  opt = lo.as_optax(num_steps=20, sp=True)
  value = jnp.asarray(0.7) if with_value else None

  @jax.jit
  def step(grads, state, params):
    return opt.update(grads, state, params, value=value)

  grads = lambda t: jax.tree.map(lambda p: jnp.cos(t * p + 0.1), params)
  state = opt.init(params)
  for t in range(3):
    _, state = step(grads(t), state, params)
  bad_grads = {"w": grads(3)["w"].at[2, 1].set(bad), "b": grads(3)["b"]}
  updates, after = step(bad_grads, state, params)
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(np.asarray(u), 0.0)
  assert int(after.num_nonfinite) == 1 and int(state.num_nonfinite) == 0
  for a, b in zip(jax.tree.leaves(after._replace(num_nonfinite=state.num_nonfinite)),
                  jax.tree.leaves(state)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Training goes on: the next finite step is the one a run without the bad step takes.
  u_next, s_next = step(grads(4), after, params)
  u_ref, s_ref = step(grads(4), state, params)
  for a, b in zip(jax.tree.leaves(u_next), jax.tree.leaves(u_ref)):
    assert bool(jnp.all(jnp.isfinite(a))) and float(jnp.max(jnp.abs(a))) > 0
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(s_next.num_nonfinite) == 1 and int(s_next.count) == int(s_ref.count) == 4


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_loss_step_is_skipped_and_counted(bad):
  lo, params = _nonfinite_problem()
  opt = lo.as_optax(sp=True)
  step = jax.jit(lambda g, s, p, v: opt.update(g, s, p, value=v))
  grads = jax.tree.map(jnp.ones_like, params)
  _, state = step(grads, opt.init(params), params, 1.0)
  updates, after = step(grads, state, params, jnp.float32(bad))
  assert all(float(jnp.max(jnp.abs(u))) == 0 for u in jax.tree.leaves(updates))
  assert int(after.num_nonfinite) == 1
  for a, b in zip(jax.tree.leaves(after._replace(num_nonfinite=state.num_nonfinite)),
                  jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  updates, _ = step(grads, after, params, 0.9)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_learning_rate_and_num_steps_under_inject_hyperparams_and_jit():
  """optax.inject_hyperparams(lo.as_optax) traces learning_rate and num_steps under jit;
  the LO equals the plain one and reads the learning rate from the state."""
  lo = LearnedOptimizer.random(jax.random.key(2), output_scale=0.3).with_config(
      horizon_decay="linear")
  params = {"w": jnp.linspace(-1, 1, 12).reshape(4, 3)}
  grads = {"w": jnp.cos(params["w"])}
  opt = optax.inject_hyperparams(lo.as_optax, static_args=("sp",))(
      learning_rate=0.5, num_steps=4, sp=True)
  plain = lo.as_optax(num_steps=4, learning_rate=0.5, sp=True)
  update = jax.jit(opt.update)
  state, plain_state = opt.init(params), plain.init(params)
  for _ in range(3):
    updates, state = update(grads, state, params)
    expected, plain_state = plain.update(grads, plain_state, params)
    np.testing.assert_allclose(updates["w"], expected["w"], rtol=1e-6)
  state.hyperparams["learning_rate"] = jnp.zeros_like(state.hyperparams["learning_rate"])
  updates, _ = update(grads, state, params)
  np.testing.assert_array_equal(updates["w"], 0.0)


@pytest.mark.parametrize("kwargs, match", [
    ({"learning_rate": np.inf}, r"learning_rate=inf.*\[0, inf\)"),
    ({"learning_rate": "0.1"}, r"learning_rate='0.1'.*not a number"),
    ({"learning_rate": -1.0}, r"learning_rate=-1.0"),
    ({"num_steps": 2.5}, r"num_steps=2.5"),
])
def test_as_optax_rejects_bad_hyperparameters_in_one_line(kwargs, match):
  lo = LearnedOptimizer.from_classical("adamw")
  with pytest.raises((TypeError, ValueError), match=match) as err:
    lo.as_optax(**kwargs)
  assert "\n" not in str(err.value)
