"""Properties every optimizer of the contract must have, run from one table.

* Each optimizer trains a small MLP (64 -> 32 -> 10, float32, full-batch digits) to
  below ``factor`` x its initial loss in ``TRAIN_STEPS`` steps at the learning rate of
  its row (its default where it has one).
* Over pytrees drawn from a fixed pool of layouts (scalar, vector, matrix, 4-D kernel)
  in float32 and bfloat16: updates keep the parameters' shapes and dtypes, are finite
  (zero gradients included), the state keeps its types (no recompilation on the second
  call), and ``jit``/``vmap`` over a batch of parameter trees work.
* ``optax.inject_hyperparams`` works, traced hyperparameters pass validation, schedules
  are accepted, every ``update`` accepts the ``value=`` extra argument.
* Out-of-range concrete hyperparameters raise ValueError naming the parameter and the
  range; loss-based optimizers called without ``value=`` say so.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_digits

import metaopt.optimizers as mo
from metaopt import mup

# The contract (DESIGN.md): every name must exist in metaopt.optimizers.
CONTRACT = ("sgdm", "nesterov", "adamw", "mu_adamw", "lion", "cautious", "cautious_adamw",
            "cautious_lion", "tam", "adatam", "ademamix", "momo", "momo_adam", "alr_smag",
            "grams", "laprop", "adan", "schedule_free_adamw", "mars_adamw", "adamp", "sgdp",
            "muon")

TRAIN_STEPS = 300


def _mu_roles(params):
  """muP roles for any tree: matrices and kernels hidden at twice the base width."""
  labels = jax.tree.map(lambda x: "hidden" if jnp.ndim(x) >= 2 else "vector", params)
  return mup.roles_from_labels(params, labels, base_width_multiplier=2.0)


@dataclasses.dataclass(frozen=True, eq=False)
class Case:
  """One row: how to build the optimizer and what it must do.

  Attributes:
    name: the contract name (the factory is ``metaopt.optimizers.<name>``).
    lr: learning rate of the training test (the factory's default where it has one).
    needs_value: ``update`` needs ``value=loss``.
    betas: decay hyperparameters that must lie in [0, 1).
    eps: name of the denominator guard that must be > 0 (None if there is none).
    fixed: arguments that are not hyperparameters (``roles``, the wrapped ``base``).
    static: of ``fixed``, those ``optax.inject_hyperparams`` must not trace or call.
    factor: final training loss must be below ``factor`` x the initial loss.
  """

  name: str
  lr: float
  needs_value: bool = False
  betas: tuple[str, ...] = ()
  eps: str | None = None
  fixed: tuple[tuple[str, object], ...] = ()
  static: tuple[str, ...] = ()
  factor: float = 0.5

  @property
  def factory(self):
    return getattr(mo, self.name)

  def make(self, **hyperparameters) -> optax.GradientTransformation:
    return self.factory(**dict(self.fixed), **hyperparameters)

  def make_injected(self, **hyperparameters) -> optax.GradientTransformation:
    return optax.inject_hyperparams(self.factory, static_args=self.static)(
        **dict(self.fixed), **hyperparameters)

  def __repr__(self):
    return self.name


CASES = [
    Case("sgdm", 0.1, betas=("momentum",)),
    Case("nesterov", 0.1, betas=("momentum",)),
    Case("adamw", 1e-3, betas=("b1", "b2"), eps="eps"),
    Case("mu_adamw", 1e-3, betas=("b1", "b2"), eps="eps", fixed=(("roles", _mu_roles),),
         static=("roles",)),
    Case("lion", 1e-3, betas=("b1", "b2")),  # default 1e-4 is too slow for 300 steps
    Case("cautious", 1e-3, fixed=(("base", optax.scale_by_adam()),)),
    Case("cautious_adamw", 1e-3, betas=("b1", "b2"), eps="eps"),
    Case("cautious_lion", 1e-3, betas=("b1", "b2")),  # default 1e-4, as lion
    Case("tam", 0.01, betas=("beta", "gamma")),
    Case("adatam", 1e-3, betas=("beta", "gamma", "b2"), eps="eps"),
    Case("ademamix", 1e-3, betas=("b1", "b2", "b3"), eps="eps"),
    Case("momo", 1.0, needs_value=True, betas=("beta",)),
    Case("momo_adam", 1e-2, needs_value=True, betas=("b1", "b2"), eps="eps"),
    Case("alr_smag", 0.1, needs_value=True, betas=("beta",)),
    Case("grams", 1e-3, betas=("b1", "b2"), eps="eps"),
    Case("laprop", 4e-4, betas=("b1", "b2"), eps="eps"),
    Case("adan", 1e-3, betas=("b1", "b2", "b3"), eps="eps"),
    Case("schedule_free_adamw", 2.5e-3, betas=("b2",), eps="eps"),  # b1 in (0, 1)
    Case("mars_adamw", 3e-3, betas=("b1", "b2"), eps="eps"),
    Case("adamp", 1e-3, betas=("b1", "b2"), eps="eps"),
    Case("sgdp", 0.1, betas=("momentum",), eps="eps"),
    Case("muon", 0.02, betas=("beta", "adam_b1", "adam_b2"), eps="eps",
         fixed=(("roles", _mu_roles),), static=("roles",)),  # Muon on matrices, kernels
]
assert tuple(c.name for c in CASES) == CONTRACT
MISSING = [n for n in CONTRACT if not hasattr(mo, n)]
PRESENT = [c for c in CASES if c.name not in MISSING]
EPS_CASES = [c for c in PRESENT if c.eps]
VALUE_CASES = [c for c in PRESENT if c.needs_value]

# Known failures of the optimizers (not of these tests); each is a strict xfail, so
# the marker has to go when the optimizer is fixed.
EPS_ZERO_ACCEPTED: dict[str, str] = {}
INJECT_FAILS: dict[str, str] = {}


# Optimizers whose update is a difference of iterates (y_{k+1} - y_k, both of the size of
# the parameters): float32 rounding of the iterates, which compiled programs may order
# differently (a constant b1 lets XLA turn x / b1 into x * (1 / b1); a traced one does
# not), leaves ~1 ulp of |params| in each of the three iterates they combine, so two
# correct implementations agree to a few ulps of |params|, not to rtol of the update.
ITERATE_DIFFERENCE = {"schedule_free_adamw"}


def _update_atol(case, params) -> float:
  """Absolute tolerance between two compiled versions of one update of ``case``."""
  if case.name not in ITERATE_DIFFERENCE:
    return 1e-7
  biggest = max(float(jnp.max(jnp.abs(p))) for p in jax.tree.leaves(params))
  return 4 * float(np.finfo(np.float32).eps) * biggest


def _known_issues(cases, issues):
  return [pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=issues[c.name]))
          if c.name in issues else c for c in cases]


def test_contract_names_exist():
  assert not MISSING, f"metaopt.optimizers lacks contract names: {MISSING}"


def _update(case, opt, grads, state, params, value):
  if case.needs_value:
    return opt.update(grads, state, params, value=value)
  return opt.update(grads, state, params)


# ----------------------------------------------------------------------------------
# Training: a 64 -> 32 -> 10 MLP on scikit-learn's digits, full batch, float32.


@functools.lru_cache(maxsize=None)
def _digits():
  x, y = load_digits(return_X_y=True)
  return jnp.asarray(x / 16.0, jnp.float32), jnp.asarray(y, jnp.int32)


def _mlp_init(seed=0):
  rng = np.random.default_rng(seed)
  sizes = [(64, 32), (32, 10)]
  params = {}
  for i, (n_in, n_out) in enumerate(sizes):
    params[f"w{i}"] = jnp.asarray(rng.normal(size=(n_in, n_out)) * np.sqrt(2.0 / n_in),
                                  jnp.float32)
    params[f"b{i}"] = jnp.zeros((n_out,), jnp.float32)
  return params


def _mlp_loss(params, x, y):
  h = jax.nn.relu(x @ params["w0"] + params["b0"])
  logits = h @ params["w1"] + params["b1"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@pytest.mark.parametrize("case", PRESENT, ids=repr)
def test_trains_mlp_on_digits(case):
  x, y = _digits()
  opt = case.make(learning_rate=case.lr)
  params = _mlp_init()

  @jax.jit
  def train(params):

    def step(carry, _):
      params, state = carry
      loss, grads = jax.value_and_grad(_mlp_loss)(params, x, y)
      updates, state = _update(case, opt, grads, state, params, loss)
      return (optax.apply_updates(params, updates), state), loss

    (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), None,
                                       length=TRAIN_STEPS)
    return losses, _mlp_loss(params, x, y)

  losses, final = train(params)
  initial = float(losses[0])
  assert np.all(np.isfinite(losses)), f"{case.name}: non-finite training loss"
  assert float(final) < case.factor * initial, (
      f"{case.name} (lr={case.lr}): loss {initial:.4f} -> {float(final):.4f} after "
      f"{TRAIN_STEPS} steps; expected below {case.factor} x initial")


# ----------------------------------------------------------------------------------
# Property tests over pytrees drawn from a fixed pool of layouts.

# Every layout holds a scalar, a vector, a matrix and a 4-D kernel, in different trees.
LAYOUTS = (
    {"scalar": (), "vector": (5,), "matrix": (4, 3), "kernel": (3, 3, 2, 4)},
    {"dense": {"kernel": (4, 3), "bias": (3,)}, "conv": {"kernel": (2, 2, 1, 3),
                                                         "scale": (3,)}, "step": ()},
    [(2, 3), {"a": (6,), "k": (2, 2, 1, 3), "s": ()}],
)
DTYPES = (jnp.float32, jnp.bfloat16)


def _is_shape(x):
  return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def _random_tree(layout, dtype, seed, *, zero_first_leaf=False):
  rng = np.random.default_rng(seed)
  tree = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), dtype), layout,
                      is_leaf=_is_shape)
  if zero_first_leaf:
    leaves, treedef = jax.tree.flatten(tree)
    leaves[0] = jnp.zeros_like(leaves[0])
    tree = jax.tree.unflatten(treedef, leaves)
  return tree


def _avals(tree):
  """(shape, dtype, weak_type) of every leaf: what jit keys its cache on."""
  return jax.tree.map(lambda a: (a.shape, a.dtype, a.weak_type),
                      jax.eval_shape(lambda t: t, tree))


def _check_updates(case, updates, params):
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert u.shape == p.shape, f"{case.name}: update shape {u.shape} != param {p.shape}"
    assert u.dtype == p.dtype, f"{case.name}: update dtype {u.dtype} != param {p.dtype}"
    assert bool(jnp.all(jnp.isfinite(u))), f"{case.name}: non-finite update {u}"


@functools.cache
def _jitted_update(case):
  """The optimizer of ``case`` and its jitted update, shared by all drawn examples."""
  opt = case.make(learning_rate=case.lr)
  return opt, jax.jit(functools.partial(_update, case, opt))


@functools.cache
def _jitted_batched_update(case):
  opt, _ = _jitted_update(case)
  return jax.jit(jax.vmap(functools.partial(_update, case, opt)))


TREES = st.tuples(st.sampled_from(LAYOUTS), st.integers(0, 2**16), st.booleans())
PROPERTY_SETTINGS = settings(max_examples=2, deadline=None, derandomize=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", PRESENT, ids=repr)
@PROPERTY_SETTINGS
@given(tree=TREES)
def test_jit_updates_keep_shapes_dtypes_and_state_types(case, dtype, tree):
  layout, seed, zero_grad = tree
  params = _random_tree(layout, dtype, seed)
  grads = _random_tree(layout, dtype, seed + 1, zero_first_leaf=zero_grad)
  opt, update = _jitted_update(case)
  state = opt.init(params)
  value = jnp.asarray(1.5, jnp.float32)
  updates, new_state = update(grads, state, params, value)
  _check_updates(case, updates, params)
  assert _avals(new_state) == _avals(state), f"{case.name}: state types changed"
  compiled = update._cache_size()
  params = optax.apply_updates(params, updates)
  updates, _ = update(grads, new_state, params, value)
  _check_updates(case, updates, params)
  assert update._cache_size() == compiled, f"{case.name}: recompiled on the second call"


@pytest.mark.parametrize("case", PRESENT, ids=repr)
@PROPERTY_SETTINGS
@given(tree=TREES)
def test_vmap_over_a_batch_of_param_trees(case, tree):
  layout, seed, zero_grad = tree
  batch = 3
  params = jax.tree.map(lambda *xs: jnp.stack(xs),
                        *[_random_tree(layout, jnp.float32, seed + 2 * i) for i in range(batch)])
  grads = jax.tree.map(lambda *xs: jnp.stack(xs), *[
      _random_tree(layout, jnp.float32, seed + 2 * i + 1, zero_first_leaf=zero_grad)
      for i in range(batch)])
  values = jnp.arange(1.0, batch + 1.0, dtype=jnp.float32)
  opt, update = _jitted_update(case)
  updates, _ = _jitted_batched_update(case)(grads, jax.vmap(opt.init)(params), params,
                                            values)
  _check_updates(case, updates, params)
  # Each batch member gets the update it would get alone (no mixing across members).
  g, p = jax.tree.map(lambda x: x[1], (grads, params))
  single, _ = update(g, opt.init(p), p, values[1])
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(updates)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b[1]), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------
# Hyperparameters: inject_hyperparams, tracers, schedules, extra args.


def _small_problem():
  params = _random_tree(LAYOUTS[0], jnp.float32, 0)
  grads = _random_tree(LAYOUTS[0], jnp.float32, 1)
  return params, grads, jnp.asarray(1.5, jnp.float32)


@pytest.mark.parametrize("case", _known_issues(PRESENT, INJECT_FAILS), ids=repr)
def test_inject_hyperparams(case):
  params, grads, value = _small_problem()
  opt = case.make_injected(learning_rate=case.lr)
  update = jax.jit(functools.partial(_update, case, opt))
  state = opt.init(params)
  updates, state = update(grads, state, params, value)
  _check_updates(case, updates, params)
  assert any(float(jnp.max(jnp.abs(u))) > 0 for u in jax.tree.leaves(updates))
  # Reference: the plain optimizer gives the same first step.
  plain, plain_update = _jitted_update(case)
  expected, _ = plain_update(grads, plain.init(params), params, value)
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(updates)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=_update_atol(case, params))
  # The learning rate lives in the state and is read from there: 0 freezes the params.
  # (Schedule-Free's average x keeps moving toward z after a step with lr > 0, whatever
  # the current lr: there lr = 0 freezes the params from the start.)
  if case.name in ITERATE_DIFFERENCE:
    state = opt.init(params)
  state.hyperparams["learning_rate"] = jnp.zeros_like(state.hyperparams["learning_rate"])
  updates, _ = update(grads, state, params, value)
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(np.asarray(u), 0.0)


def test_schedule_free_warmup_steps_under_inject_hyperparams_and_jit():
  """A traced warmup_steps (inject_hyperparams under jit) gives the plain optimizer's
  steps, warmup included; a traced 0 is no warmup (it used to fail on `if warmup_steps`)."""
  params, grads, _ = _small_problem()
  atol = _update_atol(next(c for c in CASES if c.name == "schedule_free_adamw"), params)
  for warmup in (0, 3):
    opt = optax.inject_hyperparams(mo.schedule_free_adamw)(learning_rate=1e-2,
                                                           warmup_steps=warmup)
    plain = mo.schedule_free_adamw(1e-2, warmup_steps=warmup)
    update = jax.jit(opt.update)
    state, plain_state = opt.init(params), plain.init(params)
    assert jnp.issubdtype(state.hyperparams["warmup_steps"].dtype, jnp.integer)
    for _ in range(4):
      updates, state = update(grads, state, params)
      expected, plain_state = plain.update(grads, plain_state, params)
      for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(updates)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=atol)


def _check_update_types(case, updates, params):
  """Like _check_updates, for abstract (ShapeDtypeStruct) updates."""
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert (u.shape, u.dtype) == (p.shape, p.dtype), f"{case.name}: {u} for {p}"


@pytest.mark.parametrize("case", PRESENT, ids=repr)
def test_traced_hyperparameters_and_schedules_pass_validation(case):
  # Tracing is enough here (jax.eval_shape): validation must let tracers through.
  params, grads, value = _small_problem()
  defaults = {"learning_rate": case.lr, **{b: 0.5 for b in case.betas}}
  if case.eps:
    defaults[case.eps] = 1e-8

  def first_update(hypers):
    opt = case.make(**hypers)
    return _update(case, opt, grads, opt.init(params), params, value)[0]

  hypers = {n: jnp.float32(v) for n, v in defaults.items()}
  _check_update_types(case, jax.eval_shape(first_update, hypers), params)
  schedule = optax.linear_schedule(case.lr, 0.0, transition_steps=10)
  opt = case.make(learning_rate=schedule)
  updates = jax.eval_shape(lambda: _update(case, opt, grads, opt.init(params), params,
                                           value)[0])
  _check_update_types(case, updates, params)


@pytest.mark.parametrize("case", PRESENT, ids=repr)
def test_update_accepts_the_value_extra_argument(case):
  params, grads, value = _small_problem()
  opt = case.make(learning_rate=case.lr)
  updates = jax.eval_shape(lambda: opt.update(grads, opt.init(params), params,
                                              value=value)[0])
  _check_update_types(case, updates, params)


# ----------------------------------------------------------------------------------
# Bad input.

_INTERVAL_0_1 = r"[\[(]0(\.0*)?, 1(\.0*)?[\])]"
_INTERVAL_0_INF = r"[\[(]0(\.0*)?, inf\)"


def _raises_naming(name, interval, make):
  with pytest.raises(ValueError) as err:
    make()
  msg = str(err.value)
  assert re.search(rf"\b{re.escape(name)}\b", msg), f"message does not name {name}: {msg}"
  assert re.search(interval, msg), f"message does not state the range: {msg}"


@pytest.mark.parametrize("case", PRESENT, ids=repr)
def test_negative_learning_rate_raises(case):
  _raises_naming("learning_rate", _INTERVAL_0_INF,
                 lambda: case.make(learning_rate=-case.lr))


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1])
@pytest.mark.parametrize("case", [c for c in PRESENT if c.betas], ids=repr)
def test_beta_outside_unit_interval_raises(case, bad):
  for beta in case.betas:
    _raises_naming(beta, _INTERVAL_0_1,
                   lambda: case.make(learning_rate=case.lr, **{beta: bad}))  # pylint: disable=cell-var-from-loop


@pytest.mark.parametrize("case", PRESENT, ids=repr)
def test_infinite_learning_rate_raises(case):
  _raises_naming("learning_rate", _INTERVAL_0_INF,
                 lambda: case.make(learning_rate=float("inf")))


@pytest.mark.parametrize("case", EPS_CASES, ids=repr)
def test_infinite_eps_raises(case):
  _raises_naming(case.eps, _INTERVAL_0_INF,
                 lambda: case.make(learning_rate=case.lr, **{case.eps: np.inf}))


@pytest.mark.parametrize("case", [c for c in PRESENT if "weight_decay" in
                                  c.factory.__code__.co_varnames], ids=repr)
def test_infinite_or_nan_weight_decay_raises(case):
  for bad in (np.inf, np.nan):
    _raises_naming("weight_decay", _INTERVAL_0_INF,
                   lambda: case.make(learning_rate=case.lr, weight_decay=bad))  # pylint: disable=cell-var-from-loop


@pytest.mark.parametrize("case", PRESENT, ids=repr)
def test_string_learning_rate_raises_one_line_type_error(case):
  with pytest.raises(TypeError, match=r"learning_rate='0.1' \(str\) is not a number") as err:
    case.make(learning_rate="0.1")
  assert "\n" not in str(err.value)


@pytest.mark.parametrize("case", EPS_CASES, ids=repr)
def test_negative_eps_raises(case):
  _raises_naming(case.eps, _INTERVAL_0_INF,
                 lambda: case.make(learning_rate=case.lr, **{case.eps: -1e-8}))


@pytest.mark.parametrize("case", _known_issues(EPS_CASES, EPS_ZERO_ACCEPTED), ids=repr)
def test_zero_eps_raises(case):
  _raises_naming(case.eps, r"\(0(\.0*)?, inf\)",
                 lambda: case.make(learning_rate=case.lr, **{case.eps: 0.0}))


@pytest.mark.parametrize("case", VALUE_CASES, ids=repr)
def test_loss_based_optimizer_without_value_says_value_loss(case):
  params, grads, _ = _small_problem()
  opt = case.make(learning_rate=case.lr)
  with pytest.raises(ValueError, match=r"value=loss"):
    opt.update(grads, opt.init(params), params)
