"""Where the learned optimizer's update spends its time, pass by pass (run by hand).

On the 3-layer MLP trees of ``benchmarks/step_cost.py``'s update benchmark (three square
matrices and three biases; 1e5: everything in the flat buffer, 1e6 and 1e7: the
matrices in their own buffers), each pass of :func:`metaopt.lopt._update.update` is
jitted on its own, on the inputs it sees after three real steps (random gradients):

* ``pack/unpack``: gradients and parameters into the flat layout, the updates back out;
* ``pass 1``: moments and the raw per-tensor sums (``_first_pass``);
* ``factored``: Adafactor's row/column accumulators (``_factored_pass``);
* ``tam/laprop``: TAM's and LaProp's momenta (``_tam_laprop_pass``);
* ``statistics``: every feature statistic (``_statistics_pass``);
* ``elementwise``: features, MLP and the update (``_tensor_update``);
* the whole update, and ``optax.adam``'s for scale.

All are timed in interleaved rounds (each program once per round, ``--repeats`` calls;
medians of the per-round medians). For each, XLA's cost analysis (flops, bytes
accessed; ``compile().cost_analysis()``) gives the implied GB/s and GFLOP/s, next to two
floors measured in the same rounds on the same number of elements: ``copy``, a
streaming kernel reading and writing as many parameter-sized float32 buffers as the pass
takes and returns (``r``/``w``), and ``fma``, one elementwise loop of as many
multiply-adds per element as the pass's flops (four independent chains). A pass near
its copy floor is memory-bound; one near its FMA floor is compute-bound.

Usage: python benchmarks/update_passes.py [--sizes 1e5 1e6 1e7]
       [--repeats 10] [--rounds 5] [--transformers 6]
(It times this checkout's engine, not an installed one; the header prints which ran.)
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

# Runnable from a clone without `pip install -e .`: the repository root goes first on
# the import path, so the script imports this checkout's metaopt and tasks.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax

import metaopt
from metaopt import features as F
from metaopt.lopt import _engine as E
from metaopt.lopt import _rule as R
from metaopt.lopt import _state as S

from step_cost import timings, mlp_params, transformer_lm  # pylint: disable=g-bad-import-order


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {k: float(cost.get(k, 0.0)) for k in ("flops", "bytes accessed", "transcendentals")}


def _big_bytes(tree, n: int) -> float:
  """Parameter-sized float32 buffers in ``tree`` (arrays of >= 1% of n elements)."""
  return sum(a.size for a in jax.tree.leaves(tree) if a.size >= n // 100) / n


class Setup:
  """The engine's inputs and intermediates at every pass boundary for one tree."""

  def __init__(self, params, *, steps: int = 3):
    lo = metaopt.LearnedOptimizer.random(jax.random.key(0), output_scale=0.05)
    self.config, self.theta = lo.config, lo.theta
    self.opt = lo.as_optax(num_steps=1000, sp=True)
    self.params = params
    state = self.opt.init(params)
    step = jax.jit(lambda g, s, p: self.opt.update(g, s, p, value=jnp.float32(1.0)))
    key = jax.random.key(1)
    for _ in range(steps):
      key, sub = jax.random.split(key)
      keys = jax.random.split(sub, len(jax.tree.leaves(params)))
      grads = jax.tree.unflatten(jax.tree.structure(params), [
          0.1 * jax.random.normal(k, p.shape, p.dtype)
          for k, p in zip(keys, jax.tree.leaves(params))])
      updates, state = step(grads, state, params)
      params = optax.apply_updates(params, updates)
    self.params, self.grads, self.state = params, grads, state
    self.g = jax.tree.leaves(grads)
    self.x = jax.tree.leaves(params)
    self.keys = [(a.shape, a.dtype) for a in self.g]
    assert S.is_flat(state)
    self._intermediates()

  def blocks(self, count):
    return E.Blocks(self.keys, True, count)

  @staticmethod
  def buffers(packed):
    return [packed.flat, *packed.tensors]

  def ctx(self, count):
    """StepContext as update() builds it (value given, linear decay, num_steps=1000)."""
    c = self.config
    t = count.astype(jnp.float32)
    bc = lambda b: 1 - jnp.asarray(b, jnp.float32)**t
    return R.StepContext(bc_fast=bc(c.momentum_decays[0]), bc_v=bc(c.second_moment_decay),
                         bc_laprop=bc(c.laprop_b1),
                         momo_tau=jnp.float32(0.3) * c.momo_alpha, learning_rate=1 - t / 1000,
                         count=count)

  # ---- the passes, each as it runs inside update() (same engine functions) ----

  def pack_unpack(self, count, g, x, u_blocks):
    blocks = self.blocks(count)
    return blocks.pack(g), blocks.pack(x), blocks.unpack(u_blocks)

  def first(self, count, momenta, v, tam, g_b, x_b):
    blocks, ctx = self.blocks(count), self.ctx(count)
    fn = lambda p, *a: R.advance_moments(self.config, ctx.bc_v, True, p, *a)
    prev = [R.Moments(*b) for b in zip(*(self.buffers(b) for b in (*momenta, v)))]
    return blocks.map_summed(fn, prev, self.buffers(tam), g_b, x_b, dtype=jnp.float32)

  def factored(self, acc, g):
    decay = jnp.float32(self.config.factored_decay)
    return [R.advance_factored(decay, None, a, gr)[0] for a, gr in zip(acc, g)]

  def tam_laprop(self, count, damping, tam, laprop, g_b, v_b):
    blocks, ctx = self.blocks(count), self.ctx(count)
    fn = lambda *a: R.advance_tam_laprop(self.config, ctx.bc_v, *a)
    return blocks.map(fn, blocks.split(damping), self.buffers(tam), self.buffers(laprop),
                      g_b, v_b)

  def _inputs(self, blocks, g_b, x_b, moments, m_mid_prev, tam, laprop, rsqrt):
    scales = blocks.split(jnp.stack(jax.tree.leaves(self.state.mup_scale)))
    return [R.LeafInputs(g=gr, x=xx, m_fast=m.m_fast, m_mid_prev=mid, m_slow=m.m_slow,
                         v=m.v, tam_m=tm, laprop_m=lp, rsqrt_fact=rf, mup_scale=s)
            for gr, xx, m, mid, tm, lp, rf, s in zip(
                g_b, x_b, moments, m_mid_prev, tam, laprop, rsqrt, scales)]

  def statistics(self, count, g_b, x_b, moments, m_mid_prev, tam, laprop, rsqrt):
    blocks, ctx, one = self.blocks(count), self.ctx(count), E.runtime_one(count, 2)
    inputs = self._inputs(blocks, g_b, x_b, moments, m_mid_prev, tam, laprop, rsqrt)
    read = lambda inp: E.on_own_copy(inp, one, R.BUFFER_FIELDS, R.with_rsqrt_fact)
    fn = lambda inp: R.feature_statistics(self.config, ctx, read(inp))
    return blocks.map_summed(fn, inputs, dtype=jnp.float32, masked=True)[1]

  def elementwise(self, count, g_b, x_b, moments, m_mid_prev, tam, laprop, rsqrt, scalars):
    blocks, ctx, one = self.blocks(count), self.ctx(count), E.runtime_one(count, 3)
    inputs = self._inputs(blocks, g_b, x_b, moments, m_mid_prev, tam, laprop, rsqrt)
    read = lambda inp: E.on_own_copy(inp, one, R.BUFFER_FIELDS, R.with_rsqrt_fact)
    fn = lambda inp, row: R.tensor_update(self.config, self.theta, ctx, read(inp), row)
    return blocks.map(fn, inputs, blocks.split(scalars))

  def _intermediates(self):
    """Concrete inputs of every pass (computed once, by the passes themselves)."""
    st = self.state
    self.count = st.count + 1
    blocks = self.blocks(self.count)
    self.g_b, self.x_b = jax.jit(lambda g, x: (blocks.pack(g), blocks.pack(x)))(self.g,
                                                                                 self.x)
    self.momenta, self.v, self.tam = st.momenta, st.second_moment, st.tam_momentum
    self.moments, self.sums1 = jax.jit(self.first)(self.count, self.momenta, self.v,
                                                   self.tam, self.g_b, self.x_b)
    self.acc_prev = jax.tree.leaves(st.factored,
                                    is_leaf=lambda a: isinstance(a, F.FactoredMoment))
    self.acc = jax.jit(self.factored)(self.acc_prev, self.g)
    # Adafactor's 1 / sqrt(V_hat) as update() hands it on: packed (materialized) for the
    # flat buffer, the accumulators for a tensor of its own.
    decay = jnp.float32(self.config.factored_decay)
    rsqrt = jax.jit(lambda acc, g: [R.advance_factored(decay, None, a, gr)[1]
                                    for a, gr in zip(acc, g)])(self.acc_prev, self.g)
    small = set(blocks.small)
    packed = jax.jit(blocks.pack)(rsqrt)
    self.rsqrt = [packed[0]] + [self.acc[i] for i in blocks.large] if small else [
        self.acc[i] for i in blocks.large]
    self.damping = F.tam_damping(F.update_torque_ema(st.torque_ema, F.torque_cosine_from_sums(
        *self.sums1[:, :3].T), self.config.tam_gamma))
    self.v_b = [m.v for m in self.moments]
    self.tam_new, self.laprop_new = zip(*jax.jit(self.tam_laprop)(
        self.count, self.damping, self.tam, st.laprop_momentum, self.g_b, self.v_b))
    self.m_mid_prev = self.buffers(st.momenta[1])
    self.stat_args = (self.count, self.g_b, self.x_b, list(self.moments), self.m_mid_prev,
                      list(self.tam_new), list(self.laprop_new), self.rsqrt)
    sums2 = jax.jit(self.statistics)(*self.stat_args)
    n = len(self.g)
    per_tensor = jnp.stack([self.damping, jnp.full([n], 0.3), jnp.ones([n])], axis=1)
    time_f = jnp.concatenate([F.time_features(self.count, 1000, R.TIME_TAUS),
                              jnp.float32([1.0])])
    sizes = jnp.asarray([a.size for a in self.g], jnp.float32)
    self.scalars = R.tensor_scalars(self.config, self.theta, sums2, sizes, per_tensor, time_f)
    self.u_blocks = jax.jit(self.elementwise)(*self.stat_args, self.scalars)

  def programs(self) -> dict:
    """name -> (jitted function, args) of every pass, the whole update and Adam's."""
    st = self.state
    adam = optax.adam(1e-3)
    adam_state = adam.init(self.params)
    whole = lambda g, s, p: self.opt.update(g, s, p, value=jnp.float32(1.0))
    return {
        "pack/unpack": (self.pack_unpack, (self.count, self.g, self.x, self.u_blocks)),
        "pass 1": (self.first, (self.count, self.momenta, self.v, self.tam, self.g_b,
                                self.x_b)),
        "factored": (self.factored, (self.acc_prev, self.g)),
        "tam/laprop": (self.tam_laprop, (self.count, self.damping, self.tam,
                                         st.laprop_momentum, self.g_b, self.v_b)),
        "statistics": (self.statistics, self.stat_args),
        "elementwise": (self.elementwise, self.stat_args + (self.scalars,)),
        "whole update": (whole, (self.grads, st, self.params)),
        "optax.adam": (lambda g, s: adam.update(g, s), (self.grads, adam_state)),
    }


def copy_floor(n: int, reads: int, writes: int):
  """A streaming kernel: ``reads`` float32 [n] inputs, ``writes`` outputs (a sum when 0)."""
  ins = [jnp.full([n], 1.0 + i, jnp.float32) for i in range(max(reads, 1))]

  def fn(*a):
    total = sum(a[1:], a[0])
    if writes == 0:
      return jnp.sum(total)
    return tuple(total * (j + 1.0) for j in range(writes))

  return fn, tuple(ins)


def fma_floor(n: int, fmas_per_element: int):
  """One elementwise loop of ``fmas_per_element`` multiply-adds (4 independent chains)."""
  x = jnp.linspace(0.0, 1.0, n, dtype=jnp.float32)
  c, d = jnp.float32(0.999), jnp.float32(1e-3)

  def fn(x, c, d):
    chains = [x + i for i in range(4)]
    for k in range(max(fmas_per_element // 4, 1)):
      chains[k % 4] = chains[k % 4] * c + d
      chains[(k + 1) % 4] = chains[(k + 1) % 4] * c + d
      chains[(k + 2) % 4] = chains[(k + 2) % 4] * c + d
      chains[(k + 3) % 4] = chains[(k + 3) % 4] * c + d
    return chains[0] + chains[1] + chains[2] + chains[3]

  return fn, (x, c, d)


def table(params, title: str, repeats: int, rounds: int):
  n = sum(p.size for p in jax.tree.leaves(params))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    setup = Setup(params)
  programs = {}
  for name, (fn, args) in setup.programs().items():
    compiled = jax.jit(fn).lower(*args).compile()
    out = compiled(*args)
    programs[name] = dict(fn=compiled, args=args, cost=_cost(compiled),
                          r=_big_bytes(args, n), w=_big_bytes(out, n))
  for name in list(programs):
    p = programs[name]
    if name in ("whole update", "optax.adam"):
      continue
    r, w = round(p["r"]), round(p["w"])
    fn, args = copy_floor(n, r, w)
    c = jax.jit(fn).lower(*args).compile()
    programs[f"{name} copy"] = dict(fn=c, args=args, cost=_cost(c), r=r, w=w, floor=True)
    fmas = max(int(round(p["cost"]["flops"] / (2 * n))), 4)
    fn, args = fma_floor(n, fmas)
    c = jax.jit(fn).lower(*args).compile()
    programs[f"{name} fma"] = dict(fn=c, args=args, cost=_cost(c), r=1, w=1, floor=True)
  for p in programs.values():
    jax.block_until_ready(p["fn"](*p["args"]))
    p["times"] = []
  for _ in range(rounds):
    for p in programs.values():
      p["times"].append(float(np.median(timings(p["fn"], p["args"], repeats))))
  ms = {k: float(np.median(p["times"])) * 1e3 for k, p in programs.items()}
  print(f"\n### {title}: {n:.2e} parameters ({len(setup.g)} tensors, "
        f"{len(setup.blocks(setup.count).large)} of their own); load {os.getloadavg()}")
  print("| program | ms | x adam | r/w buffers | flops/param | bytes/param | GB/s | GFLOP/s "
        "| copy floor ms | fma floor ms | ms / max(floors) |")
  print("|" + "---|" * 11)
  for name, p in programs.items():
    if p.get("floor"):
      continue
    t = ms[name] / 1e3
    cost = p["cost"]
    floors = (ms.get(f"{name} copy", float("nan")), ms.get(f"{name} fma", float("nan")))
    bound = max(floors) if name in ms and f"{name} copy" in ms else float("nan")
    print(f"| {name} | {ms[name]:.2f} | {ms[name] / ms['optax.adam']:.2f}x | "
          f"{p['r']:.0f}/{p['w']:.0f} | {cost['flops'] / n:.0f} | "
          f"{cost['bytes accessed'] / n:.0f} | {cost['bytes accessed'] / t / 1e9:.1f} | "
          f"{cost['flops'] / t / 1e9:.1f} | {floors[0]:.2f} | {floors[1]:.2f} | "
          f"{ms[name] / bound:.2f} |", flush=True)
  parts = sum(ms[k] for k in ("pack/unpack", "pass 1", "factored", "tam/laprop",
                              "statistics", "elementwise"))
  print(f"\nsum of the passes {parts:.2f} ms, whole update {ms['whole update']:.2f} ms; "
        "floor kernels: copy "
        + ", ".join(f"{programs[k]['r']}r/{programs[k]['w']}w "
                    f"{programs[k]['cost']['bytes accessed'] / (ms[k] / 1e3) / 1e9:.1f} GB/s"
                    for k in programs if k.endswith(" copy"))
        + "; fma " + ", ".join(
            f"{programs[k]['cost']['flops'] / (ms[k] / 1e3) / 1e9:.1f} GFLOP/s"
            for k in programs if k.endswith(" fma")))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", type=float, nargs="*", default=[1e5, 1e6, 1e7])
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--transformers", type=int, nargs="*", default=[],
                      help="also the Flax transformer LMs of step_cost.py with these layers")
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; engine "
        f"{os.path.dirname(metaopt.__file__)}; load {os.getloadavg()}")
  for size in args.sizes:
    table(mlp_params(int(size)), "3-layer MLP", args.repeats, args.rounds)
  for layers in args.transformers:
    table(transformer_lm(layers)[0], f"{layers}-layer Flax transformer", args.repeats,
          args.rounds)


if __name__ == "__main__":
  main()
