"""Meta-training throughput: PES outer steps vs the LO and Adam as plain optimizers.

Usage::

  python benchmarks/meta_throughput.py [--members 8] [--truncation 20] [--horizon 200]
      [--hidden 32 8] [--repeats 5]

Standard comparison config: inner task an MLP 64 -> 32 -> 10 (ReLU, softmax
cross-entropy, 2410 parameters) on batches of 128 random 8x8 inputs with random labels;
a population of ``--members`` task instances (antithetic pairs: each member counts as
one inner step per step); antithetic PES with truncation length K and horizon H; the LO
with per-parameter MLP hidden width 32 and the default width.

Printed per LO width:

* PES: inner steps/s of one outer step (the jitted task program: K steps of every
  member, PES estimate, resets; plus the outer AdamW update).
* plain LO: the same number of inner steps (members x K, vmapped, ``lax.scan``) with the
  LO as a plain optimizer (fixed theta, ``value=``/``num_steps=`` given).
* plain Adam: the same with ``optax.adam``.
* ratios PES / plain LO and PES / plain Adam (time per inner step), and compile times.

Timings are the best of ``--repeats`` after compilation; on a shared machine, compare
numbers from the same invocation only.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

# Runnable from a clone without `pip install -e .`: the repository root goes first on
# the import path, so the script imports this checkout's metaopt and tasks.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import optax

import tasks
from metaopt import lopt
from metaopt.meta import MetaConfig, MetaTrainer
from metaopt.meta.inner import lo_problem


def reference_task(horizon: int):
  """MLP 64 -> 32 -> 10 on random 8x8 inputs with random labels (batch 128)."""
  data = tasks.GaussianMixtureData(num_classes=10, dim=64, separation=0.0, seed=0)
  return tasks.build(tasks.MLPConfig(data, width=32, depth=1, batch_size=128, base_width=32),
                     horizon)


def _best(fn, *args, repeats: int) -> tuple[float, float]:
  """(first call seconds incl. compilation, best later call seconds)."""
  t = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return first, best


def plain_unroll(task, members: int, length: int, step_fn, init_fn):
  """``jit(vmap(scan))``: ``length`` plain optimizer steps of ``members`` instances."""

  def member(key):
    state = init_fn(task.init(key))

    def body(carry, k):
      return step_fn(carry, task.sample_batch(k)), None

    state, _ = jax.lax.scan(body, state, jax.random.split(key, length))
    return state

  keys = jax.random.split(jax.random.PRNGKey(0), members)
  return jax.jit(jax.vmap(member)), keys


def adam_unroll(task, members, length):
  opt = optax.adam(1e-3)

  def step(carry, batch):
    params, state = carry
    grads = jax.grad(task.loss)(params, batch)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return plain_unroll(task, members, length, step, lambda p: (p, opt.init(p)))


def lo_unroll(task, members, length, lo_config, theta, horizon):
  problem = lo_problem(task, lo_config)
  t = jnp.asarray(0, jnp.int32)

  def member(key):
    state = problem.init(key)

    def body(carry, k):
      state, _ = problem.step(theta, carry, k, t, horizon)
      return state, None

    state, _ = jax.lax.scan(body, state, jax.random.split(key, length))
    return state

  keys = jax.random.split(jax.random.PRNGKey(0), members)
  return jax.jit(jax.vmap(member)), keys


def measure(hidden: int, members: int, truncation: int, horizon: int, repeats: int,
            blind_pairs: int = 0) -> dict:
  task = reference_task(horizon)
  config = MetaConfig(hidden_size=hidden, num_pairs=members // 2,
                      num_blind_pairs=blind_pairs, truncation_length=truncation,
                      horizon=horizon, min_horizon=truncation, outer_steps=10**6)
  trainer = MetaTrainer(config, task_list=[task])
  state = trainer.init()
  steps = (members + 2 * blind_pairs) * truncation

  def pes_step(state):
    return trainer.step(state)[0]

  t = time.perf_counter()
  state = pes_step(state)  # compiles the task program and the update
  jax.block_until_ready(state)
  pes_compile = time.perf_counter() - t
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    state = pes_step(state)
    jax.block_until_ready(state)
    best = min(best, time.perf_counter() - t)
  pes_s = best

  theta = trainer.warm_theta
  fn, keys = lo_unroll(task, members + 2 * blind_pairs, truncation, trainer.lo_config,
                       theta, jnp.asarray(horizon, jnp.int32))
  lo_compile, lo_s = _best(fn, keys, repeats=repeats)
  fn, keys = adam_unroll(task, members + 2 * blind_pairs, truncation)
  adam_compile, adam_s = _best(fn, keys, repeats=repeats)
  return {"hidden": trainer.lo_config.hidden_size, "theta_dim": trainer.dim,
          "inner_steps": steps, "pes_steps_per_s": steps / pes_s,
          "lo_steps_per_s": steps / lo_s, "adam_steps_per_s": steps / adam_s,
          "pes_over_lo": pes_s / lo_s, "pes_over_adam": pes_s / adam_s,
          "compile_pes_s": pes_compile, "compile_lo_s": lo_compile,
          "compile_adam_s": adam_compile}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--members", type=int, default=8)
  parser.add_argument("--blind-pairs", type=int, default=0)
  parser.add_argument("--truncation", type=int, default=20)
  parser.add_argument("--horizon", type=int, default=200)
  parser.add_argument("--hidden", type=int, nargs="+", default=[32, 0])
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  print(f"# PES meta-training throughput ({platform.machine()}, "
        f"{jax.devices()[0].platform} x{jax.device_count()}, jax {jax.__version__})\n")
  print(f"MLP 64-32-10 (2410 params), batch 128, {args.members} members "
        f"(+{2 * args.blind_pairs} blind), K={args.truncation}, H={args.horizon}\n")
  print("| LO hidden | theta dim | PES inner steps/s | plain LO steps/s | plain Adam steps/s "
        "| PES / plain LO | PES / Adam | compile PES / LO / Adam (s) |")
  print("|---|---|---|---|---|---|---|---|")
  for hidden in args.hidden:
    r = measure(hidden, args.members, args.truncation, args.horizon, args.repeats,
                args.blind_pairs)
    print(f"| {r['hidden']} | {r['theta_dim']} | {r['pes_steps_per_s']:.0f} | "
          f"{r['lo_steps_per_s']:.0f} | {r['adam_steps_per_s']:.0f} | "
          f"{r['pes_over_lo']:.2f} | {r['pes_over_adam']:.2f} | "
          f"{r['compile_pes_s']:.1f} / {r['compile_lo_s']:.1f} / {r['compile_adam_s']:.1f} |",
          flush=True)


if __name__ == "__main__":
  main()
