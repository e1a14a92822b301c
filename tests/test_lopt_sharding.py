"""The learned optimizer on sharded parameters (2 and 4 fake CPU devices).

As optax's sharding tests check its contrib optimizers: ``init`` works on a
``jax.ShapeDtypeStruct`` tree under ``jax.eval_shape`` and on sharded params, every
parameter-shaped state buffer takes its parameter's sharding, jitted updates come back
with the parameters' shardings, and the compiled update gathers no parameter. Each
device count runs in a fresh process (the device count is fixed at backend start).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

_WORKER = textwrap.dedent(r"""
  import re, sys, warnings
  import jax, jax.numpy as jnp, numpy as np, optax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  import metaopt

  n = len(jax.devices())
  assert n == int(sys.argv[1]), jax.devices()
  mesh = Mesh(np.array(jax.devices()), ("d",))
  k = jax.random.split(jax.random.key(0), 6)
  d = 64 * n
  host = {"embed": jax.random.normal(k[0], (16, d)),
          "dense": jax.random.normal(k[1], (d, 2 * d)),
          "conv": jax.random.normal(k[2], (3, 3, 4, d)),
          "bias": jax.random.normal(k[3], (d,)),
          "scale": jnp.asarray(0.7)}
  specs = {"embed": P(None, "d"), "dense": P(None, "d"), "conv": P(None, None, None, "d"),
           "bias": P("d"), "scale": P()}
  shardings = {name: NamedSharding(mesh, spec) for name, spec in specs.items()}
  params = jax.device_put(host, shardings)
  labels = {"embed": "input", "dense": "hidden", "conv": "hidden", "bias": "vector",
            "scale": "vector"}
  opt = metaopt.pretrained("v0.2.0").as_optax(num_steps=100, labels=labels)

  # init on abstract params.
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), host)
  shapes = jax.eval_shape(opt.init, abstract)
  assert jax.tree.structure(shapes) == jax.tree.structure(opt.init(host))

  # init on sharded params: parameter-shaped buffers take the parameter's sharding.
  state = opt.init(params)
  buffers = [*state.momenta, state.second_moment, state.tam_momentum,
             state.laprop_momentum]
  for tree in buffers:
    for name, buf in tree.items():
      assert buf.sharding.is_equivalent_to(shardings[name], buf.ndim), (
          name, buf.sharding, shardings[name])

  # With the step-size features: x_0 is a copy of each parameter, with its sharding.
  lo_on = metaopt.pretrained("v0.2.0").extended(step_size_features=True)
  opt_on = lo_on.as_optax(num_steps=100, labels=labels)
  assert jax.tree.structure(jax.eval_shape(opt_on.init, abstract)) == jax.tree.structure(
      opt_on.init(host))
  for name, buf in opt_on.init(params).initial_params.items():
    assert buf.sharding.is_equivalent_to(shardings[name], buf.ndim), (name, buf.sharding)
    np.testing.assert_array_equal(np.asarray(buf), np.asarray(host[name]))

  grads = jax.tree.map(lambda a: jnp.cos(a) * 0.1, params)
  step = jax.jit(lambda g, s, p: opt.update(g, s, p, value=jnp.float32(1.5)))
  hlo = step.lower(grads, state, params).compile().as_text()
  # No parameter is gathered: an all-gather may only collect per-shard partial sums
  # (XLA may all-gather a reduction's partials instead of all-reducing them), far
  # smaller than any sharded matrix.
  smallest = min(a.size for a in host.values() if a.ndim >= 2)
  for dims in re.findall(r"= f32\[([\d,]*)\][^ ]* all-gather\(", hlo):
    gathered = int(np.prod([int(x) for x in dims.split(",") if x]))
    assert gathered * 2 < smallest, (dims, re.findall(r".*all-gather.*", hlo)[:3])
  updates, new_state = step(grads, state, params)
  for name, u in updates.items():
    assert u.sharding.is_equivalent_to(shardings[name], u.ndim), (name, u.sharding)
  for tree in (new_state.momenta[0], new_state.second_moment):
    for name, buf in tree.items():
      assert buf.sharding.is_equivalent_to(shardings[name], buf.ndim), (name, buf.sharding)

  # Same numbers as on one device. Only the reduction order differs (per-shard partial
  # sums): float32 rounding of the per-tensor statistics, ~1e-6 relative, which the
  # update carries through smooth functions (the MLP, exp of a clipped magnitude).
  ref, _ = jax.jit(lambda g, s, p: opt.update(g, s, p, value=jnp.float32(1.5)))(
      jax.device_get(grads), opt.init(host), host)
  for name in host:
    np.testing.assert_allclose(np.asarray(updates[name]), np.asarray(ref[name]),
                               rtol=1e-4, atol=1e-9 * float(jnp.max(jnp.abs(ref[name]))))
  print("OK", n)
""")


@pytest.mark.parametrize("num_devices", [2, 4])
def test_sharded_init_and_update_keep_the_parameters_shardings(num_devices):
  env = {**os.environ, "PYTHONPATH": str(REPO),
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={num_devices}",
         "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", _WORKER, str(num_devices)], env=env,
                       capture_output=True, text=True, timeout=600, cwd=REPO)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"OK {num_devices}" in out.stdout


_MESH_WORKER = textwrap.dedent("""
  import sys
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  import metaopt

  axis_type = getattr(AxisType, sys.argv[1])
  k = jax.random.split(jax.random.key(0), 6)
  host = {"hidden": jax.random.normal(k[0], (128, 64)),
          "twin_rows": jax.random.normal(k[1], (32, 32)),  # one shape, two shardings
          "twin_cols": jax.random.normal(k[2], (32, 32)),
          "vector": jax.random.normal(k[3], (384,)),  # 3 rows of 128 over 2 devices
          "readout": jax.random.normal(k[4], (8, 16)),
          "scale": jnp.asarray(0.7)}
  specs = {"hidden": P("x", None), "twin_rows": P("x", None), "twin_cols": P(None, "x"),
           "vector": P("x"), "readout": P(None, "x"), "scale": P()}
  labels = {"hidden": "hidden", "twin_rows": "hidden", "twin_cols": "hidden",
            "vector": "vector", "readout": "output", "scale": "vector"}
  lo = metaopt.pretrained("v0.2.0").extended(muon=True, step_size_features=True)
  opt = lo.with_config(muon_beta=0.5).as_optax(num_steps=100, labels=labels)
  grads_of = lambda p: jax.tree.map(lambda a: jnp.cos(3 * a) * 0.1, p)

  def two_steps(init, params):
    state = init(params)
    step = jax.jit(lambda g, s, p: opt.update(g, s, p, value=jnp.float32(1.5)))
    out = []
    for _ in range(2):
      updates, state = step(grads_of(params), state, params)
      out.append(updates)
      params = jax.tree.map(lambda p, u: p + u, params, updates)
    return state, out

  _, ref = two_steps(opt.init, host)  # one device, the flat layout
  ref = jax.tree.map(np.asarray, ref)
  mesh = jax.make_mesh((2,), ("x",), axis_types=(axis_type,))
  with jax.set_mesh(mesh):
    shardings = {n: NamedSharding(mesh, spec) for n, spec in specs.items()}
    params = jax.device_put(host, shardings)
    # Under an Auto mesh a traced parameter's sharding is the compiler's to choose
    # (optax.adam's jitted init is replicated there too): init the concrete params.
    inits = [opt.init] + ([jax.jit(opt.init)] if axis_type == AxisType.Explicit else [])
    for init in inits:
      state = init(params)
      buffers = [*state.momenta, state.second_moment, state.tam_momentum,
                 state.laprop_momentum, state.initial_params]
      for tree in buffers:
        for name, buf in tree.items():
          if buf.ndim:  # Muon's own momentum is a scalar placeholder off its matrices
            assert buf.sharding.is_equivalent_to(shardings[name], buf.ndim), (
                name, buf.sharding, shardings[name])
      state, out = two_steps(init, params)
      for tree in (state.momenta[0], state.initial_params, out[-1]):
        for name, buf in tree.items():
          if axis_type == AxisType.Auto and name.startswith("twin"):
            continue  # batched as one program: the compiler picks one sharding for both
          assert buf.sharding.is_equivalent_to(shardings[name], buf.ndim), (name, buf.sharding)
      # Only the reduction order differs (per-shard partial sums): float32 rounding of
      # the per-tensor statistics, carried through smooth functions.
      for updates, expected in zip(out, ref):
        for name in host:
          np.testing.assert_allclose(
              np.asarray(updates[name]), np.asarray(expected[name]), rtol=1e-4,
              atol=1e-6 * np.max(np.abs(expected[name])), err_msg=name)
  print("OK", sys.argv[1])
""")


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_updates_under_a_mesh_match_one_device_and_state_keeps_the_shardings(axis_type):
  """``jax.make_mesh`` with Explicit axes (reshapes and stacks across a sharded axis
  must be spelled out there) or Auto ones, parameters sharded along one axis: init
  (jitted too, with Explicit axes) gives state buffers sharded like their parameters,
  and two jitted steps equal the unsharded ones. With the muon and step-size switches
  on, so every pass runs."""
  env = {**os.environ, "PYTHONPATH": str(REPO),
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", _MESH_WORKER, axis_type], env=env,
                       capture_output=True, text=True, timeout=600, cwd=REPO)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"OK {axis_type}" in out.stdout
