"""The switch interface (``metaopt.lopt._switches``): what each registered switch
declares is what the config, the state, theta and the core see.

For every switch, alone: its bool and fields are ``LOConfig`` fields (off and at their
defaults by default, left out of the JSON then); its features and candidates follow the
core's (and those of the switches registered before it); its state fields are None off
and set on; its theta entries are ``theta_shapes``'; ``extended`` with it gives the
updates of the LO without it (its weights zero), with a nonzero weight on its first
feature row others. The core modules name no switch (only in docstrings and the
``muon_fan_in`` argument kept for compatibility).
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaopt.lopt import CANDIDATE_NAMES, FEATURE_NAMES, LOConfig, LearnedOptimizer
from metaopt.lopt import _network
from metaopt.lopt._switches import SWITCHES

LABELS = {"in": "input", "hidden": "hidden", "bias": "vector", "out": "output"}


def _params():
  k = jax.random.split(jax.random.key(1), 3)
  return {"in": jax.random.normal(k[0], (5, 8)), "hidden": jax.random.normal(k[1], (8, 8)),
          "bias": jnp.zeros((8,)), "out": jax.random.normal(k[2], (8, 3))}


def _updates(lo, steps=3):
  params = _params()
  opt = lo.as_optax(num_steps=10, labels=LABELS)
  state = opt.init(params)
  step = jax.jit(lambda g, s, p: opt.update(g, s, p, value=jnp.float32(0.5)))
  for t in range(steps):
    grads = jax.tree.map(lambda p, t=t: jnp.sin(3.0 * p + t) + 0.1, params)
    updates, state = step(grads, state, params)
  return updates, state


@pytest.mark.parametrize("switch", SWITCHES, ids=lambda s: s.name)
def test_declared_config_fields_features_and_candidates(switch):
  fields = {f.name: f for f in dataclasses.fields(LOConfig)}
  assert fields[switch.name].default is False
  for field in switch.fields:
    assert fields[field.name].default == field.default
  assert switch.name not in LOConfig().to_dict()
  on = LOConfig(**{switch.name: True})
  assert on.switches_on == (switch,)
  assert on.feature_names == FEATURE_NAMES + switch.features
  assert on.candidate_names == CANDIDATE_NAMES + switch.candidates
  assert LOConfig.from_dict(on.to_dict()) == on
  assert f"    {switch.name}:" in LOConfig.__doc__
  shapes = _network.theta_shapes(on)
  for entry, shape in switch.theta_shapes(on, len(on.candidate_names)).items():
    assert shapes[entry] == shape


def test_registration_order_appends_features_and_candidates():
  every = LOConfig(**{s.name: True for s in SWITCHES})
  assert every.feature_names == FEATURE_NAMES + sum((s.features for s in SWITCHES), ())
  assert every.candidate_names == CANDIDATE_NAMES + sum((s.candidates for s in SWITCHES), ())


@pytest.mark.parametrize("switch", SWITCHES, ids=lambda s: s.name)
def test_state_fields_and_zero_weights(switch):
  base = LearnedOptimizer.random(jax.random.key(0), output_scale=0.1)
  on = base.extended(**{switch.name: True})
  off_updates, off_state = _updates(base)
  on_updates, on_state = _updates(on)
  for name in switch.state_fields:
    assert getattr(off_state, name) is None and getattr(on_state, name) is not None
  # Zero new weights: the LO without the switch, to float32 rounding (Muon's matrices
  # keep their own buffers, summed per tensor instead of in the flat buffer).
  for a, b in zip(jax.tree.leaves(off_updates), jax.tree.leaves(on_updates)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)
  row = on.config.feature_names.index(switch.features[0])
  moved = on.with_theta(dict(on.theta, w1=on.theta["w1"].at[row].set(1.0)))
  moved_updates, _ = _updates(moved)
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(on_updates),
                                                   jax.tree.leaves(moved_updates)))


_CORE = ("_config.py", "_state.py", "_rule.py", "_update.py", "_network.py", "_engine.py",
         "_layout.py", "_classical.py")


@pytest.mark.parametrize("module", _CORE)
def test_core_names_no_switch(module):
  """No attribute, name or string in the core's code (docstrings and comments aside)
  names a switch or its fields; ``muon_fan_in`` is the one compatibility argument."""
  path = pathlib.Path(__file__).resolve().parent.parent / "metaopt" / "lopt" / module
  tree = ast.parse(path.read_text())
  docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
  names = {s.name for s in SWITCHES} | {f.name for s in SWITCHES for f in s.fields} | {
      n for s in SWITCHES for n in s.state_fields + s.features + s.candidates}
  found = []
  for node in ast.walk(tree):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      continue
    text = (node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(
        node, ast.Name) else node.value if isinstance(node, ast.Constant) and isinstance(
            node.value, str) and id(node) not in docstrings else None)
    if text in names:
      found.append((node.lineno, text))
  assert not found, found
