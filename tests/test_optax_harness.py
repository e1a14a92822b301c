"""optax's shared optimizer tests, as properties of every metaopt optimizer.

The properties optax checks for its own optimizers (``optax/contrib/_common_test.py``,
``optax/_src/alias_test.py``, ``optax/_src/sharding_test.py``,
``optax/contrib/_sharding_test.py``), written here for ours: every factory named in
``metaopt.optimizers.OPTIMIZER_NAMES`` (so a new optimizer is covered by adding it
there) and the learned optimizer (the released one and ``from_classical("adamw")``):

* it minimizes a parabola over a vector and a matrix leaf;
* jitted updates keep the parameters' dtypes (float32 and bfloat16 leaves in one tree),
  the state keeps its types (so ``lax.cond`` over an update works), accepts ``value=``
  and unknown extra arguments, and a second call does not recompile;
* ``init`` takes a ``jax.ShapeDtypeStruct`` tree and gives the shapes and dtypes that
  concrete params give;
* under ``jax.jit`` and ``optax.inject_hyperparams`` (learning rate traced) the updates
  and state equal the plain ones;
* on 2 fake CPU devices, with an Auto and an Explicit mesh (one subprocess for all):
  the update works, equals the single-device update, and param-shaped state leaves keep
  the parameter's sharding (Explicit: every state leaf keeps its type from init).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metaopt
import metaopt.optimizers as mo
from metaopt import anchors, mup

REPO = pathlib.Path(__file__).resolve().parents[1]
F32_EPS = float(np.finfo(np.float32).eps)
PARABOLA_STEPS = 1000
PARABOLA_LR = 0.1  # every optimizer here reaches the optimum with it (sign-based ones
# to within ~lr per coordinate)


def _mu_roles(params):
  """muP roles for any tree (concrete or abstract): matrices hidden at twice the base."""
  labels = jax.tree.map(lambda x: "hidden" if len(x.shape) >= 2 else "vector", params)
  return mup.roles_from_labels(params, labels, base_width_multiplier=2.0)


# Arguments without a default other than the learning rate: what each factory needs to
# be built. A new optimizer with such an argument fails test_every_factory_can_be_built
# until it is listed here.
FIXED_ARGS: dict[str, dict[str, Any]] = {
    "mu_adamw": {"roles": _mu_roles},
    "cautious": {"base": optax.scale_by_adam()},
}
# Arguments optax.inject_hyperparams must not trace (callables, transforms).
STATIC_ARGS = {"mu_adamw": ("roles",), "cautious": ("base",)}
# Optimizers whose parameters to evaluate differ from the iterate they train.
EVAL_PARAMS = {"schedule_free_adamw": mo.schedule_free_eval_params}


@functools.cache
def _pretrained():
  return metaopt.pretrained()


@functools.cache
def _from_classical_adamw():
  return metaopt.LearnedOptimizer.from_classical("adamw")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One optimizer: ``factory(**fixed, learning_rate=lr)`` builds it."""

  name: str
  get_factory: Callable[[], Callable[..., optax.GradientTransformation]]
  fixed: tuple[tuple[str, Any], ...] = ()
  lr: float = PARABOLA_LR
  is_lo: bool = False

  def make(self, **overrides) -> optax.GradientTransformationExtraArgs:
    kwargs = {**dict(self.fixed), "learning_rate": self.lr, **overrides}
    return optax.with_extra_args_support(self.get_factory()(**kwargs))

  def make_injected(self, **overrides) -> optax.GradientTransformationExtraArgs:
    kwargs = {**dict(self.fixed), "learning_rate": self.lr, **overrides}
    return optax.inject_hyperparams(self.get_factory(),
                                    static_args=STATIC_ARGS.get(self.name, ()))(**kwargs)

  def __repr__(self):
    return self.name


def _classical(name: str) -> Entry:
  return Entry(name, lambda: getattr(mo, name), tuple(FIXED_ARGS.get(name, {}).items()))


ENTRIES = [_classical(n) for n in mo.OPTIMIZER_NAMES] + [
    # The released LO with the horizon it is told; learning_rate is its multiplier. Its
    # peak step is Muon's default (anchors.MUON_LR, warmup + cosine): scaled to the same
    # 0.1 peak as the others (at 1x, Adam's part moves the vector leaf ~0.04 a step and
    # stops short of the optimum, as optax.contrib.muon at that lr does).
    Entry("lo_pretrained", lambda: _pretrained().as_optax,
          (("num_steps", PARABOLA_STEPS),), lr=PARABOLA_LR / anchors.MUON_LR, is_lo=True),
    # muAdamW-free AdamW as an LO (lr 1e-3) times 100: the same 0.1 step as the others.
    Entry("lo_from_classical_adamw", lambda: _from_classical_adamw().as_optax,
          lr=PARABOLA_LR / 1e-3, is_lo=True),
]
BY_NAME = {e.name: e for e in ENTRIES}


def _step(opt, params, state, grads, value):
  return opt.update(grads, state, params, value=value,
                    unexpected_extra_arg_no_optimizer_expects=1)


def test_every_factory_can_be_built():
  """Every argument without a default, besides the learning rate, is in FIXED_ARGS."""
  missing = {}
  for name in mo.OPTIMIZER_NAMES:
    required = [p.name for p in inspect.signature(getattr(mo, name)).parameters.values()
                if p.default is inspect.Parameter.empty and p.kind in (
                    p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = set(required) - {"learning_rate"} - set(FIXED_ARGS.get(name, {}))
    if unknown:
      missing[name] = sorted(unknown)
  assert not missing, f"add these to FIXED_ARGS: {missing}"


# ----------------------------------------------------------------------------------
# Parabola: ||v - v*||^2 + ||M - M*||^2 from optax's parabola and matrix parabola.

_TARGET = {"v": np.array([1.0, -1.0, 1.0], np.float32),
           "m": np.array([[3.0, -2.0], [1.0, 4.0]], np.float32)}
_START = {"v": np.array([-1.0, 10.0, 1.0], np.float32), "m": np.zeros((2, 2), np.float32)}


def _parabola(params):
  return sum(jnp.sum(jnp.square(params[k] - _TARGET[k])) for k in params)


@pytest.mark.parametrize("entry", ENTRIES, ids=repr)
def test_minimizes_a_parabola(entry):
  opt = entry.make()
  params = jax.tree.map(jnp.asarray, _START)

  def body(carry, _):
    p, s = carry
    value, grads = jax.value_and_grad(_parabola)(p)
    u, s = _step(opt, p, s, grads, value)
    return (optax.apply_updates(p, u), s), None

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # muP role inference may warn on a 2x2 matrix
    state = opt.init(params)
  (params, state), _ = jax.jit(
      lambda p, s: jax.lax.scan(body, (p, s), length=PARABOLA_STEPS))(params, state)
  if entry.name in EVAL_PARAMS:
    params = EVAL_PARAMS[entry.name](state, params)
  start, end = float(_parabola(_START)), float(_parabola(params))
  # 1e-3 of the start: ~3% of the initial distance, optax's rtol for its parabola.
  assert end <= 1e-3 * start, f"{entry.name}: loss {start:g} -> {end:g}"


# ----------------------------------------------------------------------------------
# Dtypes and state types.

_MIXED = {"w": np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(3, 4),
          "b": np.linspace(0.5, -0.5, 4).astype(jnp.bfloat16)}


def _types(tree):
  return jax.tree.map(lambda x: (x.shape, str(x.dtype), bool(getattr(x, "weak_type",
                                                                     False))), tree)


# The LO's init returns some state buffers committed to a device and others not; the
# jitted update's outputs are all committed, so its second call compiles again.
_LO_RECOMPILES = pytest.mark.xfail(
    strict=False, reason="metaopt/lopt init_state: mixed committed/uncommitted state "
    "arrays make the second jitted update recompile (reported to the lopt helper)")


@pytest.mark.parametrize("entry", [pytest.param(e, marks=_LO_RECOMPILES) if e.is_lo else e
                                   for e in ENTRIES], ids=repr)
def test_updates_keep_dtypes_and_the_state_its_types(entry):
  opt = entry.make()
  params = jax.tree.map(jnp.asarray, _MIXED)
  grads = jax.tree.map(lambda p: (0.1 * p + 0.01).astype(p.dtype), params)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    state0 = opt.init(params)

  @jax.jit
  def step(state, pred):
    # lax.cond needs both branches to give one type: the state must keep its types.
    return jax.lax.cond(pred, lambda: _step(opt, params, state, grads, jnp.float32(1.0)),
                        lambda: (jax.tree.map(jnp.zeros_like, params), state))

  updates, state1 = step(state0, True)
  assert _types(updates) == _types(params)
  assert _types(state1) == _types(jax.tree.map(jnp.asarray, state0))
  step(state1, True)
  assert step._cache_size() == 1, "the second update recompiled"  # pylint: disable=protected-access


@pytest.mark.parametrize("entry", ENTRIES, ids=repr)
def test_init_takes_shape_dtype_structs(entry):
  opt = entry.make()
  concrete = jax.tree.map(jnp.asarray, _MIXED)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), concrete)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    want = opt.init(concrete)
    got = opt.init(abstract)
    traced = jax.eval_shape(opt.init, abstract)
  shapes = lambda t: jax.tree.map(lambda x: (x.shape, str(x.dtype)), t)
  assert shapes(got) == shapes(want)
  assert shapes(traced) == shapes(want)


# ----------------------------------------------------------------------------------
# jit and inject_hyperparams.

def _assert_trees_close(got, want, scale_tree, what):
  """Equal up to float32 rounding: a few dozen roundings (64 ulps) of the leaf's scale,
  the largest of |want| and the matching ``scale_tree`` leaf (the params, whose size
  the decay and iterate-difference terms carry)."""
  got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(got_leaves) == len(want_leaves), what
  scales = [float(np.max(np.abs(np.asarray(s, np.float32)), initial=0.0))
            for s in jax.tree.leaves(scale_tree)]
  biggest_param = max(scales)
  for i, (g, w) in enumerate(zip(got_leaves, want_leaves)):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    assert g.shape == w.shape, (what, i)
    atol = 64 * F32_EPS * max(float(np.max(np.abs(w), initial=0.0)), biggest_param, 1e-30)
    np.testing.assert_allclose(g, w, rtol=0, atol=atol, err_msg=f"{what}, leaf {i}")


# Where the injected optimizer's state holds other leaves than the plain one's: there
# the two steps' updates show that the states carry the same information.
INJECTED_STATE_DIFFERS = {"schedule_free_adamw"}  # warmup: a schedule with its own count
INJECTABLE = [e for e in ENTRIES
              if "learning_rate" in inspect.signature(e.get_factory()).parameters]


@pytest.mark.parametrize("entry", INJECTABLE, ids=repr)
def test_jit_and_inject_hyperparams_give_the_plain_updates(entry):
  """Two jitted steps, plain vs injected: equal updates (the second
  depends on the state the first left) and equal states (see INJECTED_STATE_DIFFERS)."""
  params = {"w": jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float32).reshape(3, 4),
            "b": jnp.ones(4, jnp.float32)}
  grads = [jax.tree.map(lambda p, c=c: c * p - 0.1, params) for c in (0.3, -0.2)]
  value = jnp.float32(2.0)
  opt, injected = entry.make(), entry.make_injected()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    state = opt.init(params)
    state_inj = jax.jit(injected.init)(params)
  step = jax.jit(lambda s, g: _step(opt, params, s, g, value))
  step_inj = jax.jit(lambda s, g: _step(injected, params, s, g, value))
  for i, g in enumerate(grads):
    updates, state = step(state, g)
    updates_inj, state_inj = step_inj(state_inj, g)
    _assert_trees_close(updates_inj, updates, params, f"{entry.name} updates {i + 1}")
  assert float(state_inj.hyperparams["learning_rate"]) == pytest.approx(entry.lr)
  if entry.name not in INJECTED_STATE_DIFFERS:
    _assert_trees_close(state_inj.inner_state, state, params, f"{entry.name} state")


# ----------------------------------------------------------------------------------
# Sharding on 2 fake CPU devices: one subprocess runs every optimizer, these tests read
# its results.

_SHARDING_WORKER = textwrap.dedent(r"""
  import json, sys, traceback, warnings
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  sys.path.insert(0, sys.argv[1])
  import test_optax_harness as h
  warnings.simplefilter("ignore")
  assert len(jax.devices()) == 2, jax.devices()
  SPECS = {"kernel": P(None, "x"), "w": P(None, "x"), "b": P("x")}
  rng = np.random.default_rng(0)
  host = {"kernel": rng.normal(size=(2, 8, 4)), "w": rng.normal(size=(4, 6)),
          "b": rng.normal(size=(6,))}
  host = {k: v.astype(np.float32) for k, v in host.items()}
  grads_host = [{k: (0.5 * v + rng.normal(size=v.shape)).astype(np.float32)
                 for k, v in host.items()} for _ in range(2)]
  SHAPES = {v.shape: k for k, v in host.items()}

  def run(opt, params, grads_list):
    state = opt.init(params)
    init_state = state
    step = jax.jit(lambda p, s, g: h._step(opt, p, s, g, np.float32(1.0)))
    out = []
    for g in grads_list:
      u, state = step(params, state, g)
      out.append(u)
    return init_state, state, out

  results = []
  for entry in h.ENTRIES:
    opt = entry.make()
    _, _, ref = run(opt, {k: jnp.asarray(v) for k, v in host.items()},
                    [{k: jnp.asarray(v) for k, v in g.items()} for g in grads_host])
    ref = [{k: np.asarray(v).tolist() for k, v in u.items()} for u in ref]
    for kind in ("auto", "explicit"):
      rec = {"name": entry.name, "mesh": kind, "error": None, "mismatch": [],
             "updates": None}
      try:
        mesh = jax.make_mesh((2,), ("x",), axis_types=(
            AxisType.Explicit if kind == "explicit" else AxisType.Auto,))
        put = lambda t: {k: jax.device_put(v, NamedSharding(mesh, SPECS[k]))
                         for k, v in t.items()}
        with jax.set_mesh(mesh):
          params = put(host)
          init_state, state, ups = run(opt, params, [put(g) for g in grads_host])
          for when, st in (("init", init_state), ("update", state)):
            for path, leaf in jax.tree_util.tree_leaves_with_path(st):
              name = SHAPES.get(getattr(leaf, "shape", None))
              if name is None:
                continue
              ok = leaf.sharding.is_equivalent_to(params[name].sharding, leaf.ndim)
              if not ok:
                rec["mismatch"].append(f"{when} {jax.tree_util.keystr(path)}: "
                                       f"{leaf.sharding} vs the param's "
                                       f"{params[name].sharding}")
          if kind == "explicit":
            t0 = jax.tree.map(lambda x: str(jax.typeof(x)), init_state)
            t1 = jax.tree.map(lambda x: str(jax.typeof(x)), state)
            if t0 != t1:
              rec["mismatch"].append(f"state types changed: {t0} -> {t1}")
          rec["updates"] = [{k: np.asarray(v).tolist() for k, v in u.items()}
                            for u in ups]
      except Exception as e:  # reported per optimizer and mesh
        rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
      rec["reference"] = ref
      rec["param_scale"] = max(float(np.max(np.abs(v))) for v in host.values())
      results.append(rec)
      print(entry.name, kind, rec["error"] or "ok", file=sys.stderr, flush=True)
  print("RESULTS" + json.dumps(results))
""")


@pytest.fixture(scope="module", autouse=True)
def _sharding_worker(request, tmp_path_factory):
  """Starts the 2-device worker with the module's first test, so that it runs beside
  the single-device tests (the file's time is the longer of the two, not their sum).
  Its output goes to files: a pipe nobody reads yet could fill and stall it."""
  if not any(item.module is request.module and item.name.startswith("test_sharded_")
             for item in request.session.items):
    yield None
    return
  out_dir = tmp_path_factory.mktemp("sharding_worker")
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
  with open(out_dir / "stdout", "w") as stdout, open(out_dir / "stderr", "w") as stderr:
    proc = subprocess.Popen([sys.executable, "-c", _SHARDING_WORKER, str(REPO / "tests")],
                            env=env, stdout=stdout, stderr=stderr)
  try:
    yield proc, out_dir
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


@pytest.fixture(scope="module")
def sharded_results(_sharding_worker):
  proc, out_dir = _sharding_worker
  proc.wait(timeout=600)
  stderr = (out_dir / "stderr").read_text()
  assert proc.returncode == 0, stderr[-3000:]
  line = next(l for l in (out_dir / "stdout").read_text().splitlines()
              if l.startswith("RESULTS"))
  return {(r["name"], r["mesh"]): r for r in json.loads(line[len("RESULTS"):])}


# The LO's explicit-sharding support is being fixed in metaopt/lopt (branch lopt).
_LO_EXPLICIT = pytest.mark.xfail(strict=False,
                                 reason="issue 24 item 12: lopt fix on branch lopt")
SHARDED_CASES = [pytest.param(e.name, mesh, id=f"{e.name}-{mesh}",
                              marks=_LO_EXPLICIT if e.is_lo and mesh == "explicit" else ())
                 for e in ENTRIES for mesh in ("auto", "explicit")]


@pytest.mark.parametrize("name, mesh", SHARDED_CASES)
def test_sharded_update_equals_the_single_device_one(sharded_results, name, mesh):
  rec = sharded_results[(name, mesh)]
  assert rec["error"] is None, rec["error"]
  for step, (got, want) in enumerate(zip(rec["updates"], rec["reference"])):
    # Sharded reductions add partial sums in another order: float32 rounding of the
    # update's and the params' scale.
    _assert_trees_close({k: np.asarray(v) for k, v in got.items()},
                        {k: np.asarray(v) for k, v in want.items()},
                        {"params": rec["param_scale"]},
                        f"{name} {mesh} step {step + 1}")


@pytest.mark.parametrize("name, mesh", SHARDED_CASES)
def test_sharded_state_keeps_the_param_sharding(sharded_results, name, mesh):
  rec = sharded_results[(name, mesh)]
  assert rec["error"] is None, rec["error"]
  assert not rec["mismatch"], rec["mismatch"][:5]
