"""Step cost of the learned optimizer vs optax.adam (run by hand; numbers go in the README).

Measures, side by side in one process:
1. wall time of one jitted optimizer update on MLP parameter trees of 1e4..1e7 params;
2. the whole training step (forward, backward, update) on a small transformer LM at
   batch 32 (the `tasks` character LM when available);
3. optimizer-state bytes per parameter.

Usage: python benchmarks/step_cost.py [--sizes 1e4 1e5 1e6 1e7] [--repeats 20]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import metaopt


def mlp_params(num_params: int):
  """A 3-layer MLP tree with about ``num_params`` parameters (square hidden layers)."""
  width = int(np.sqrt(num_params / 3))
  shapes = {"l0": {"w": (width, width), "b": (width,)},
            "l1": {"w": (width, width), "b": (width,)},
            "l2": {"w": (width, width), "b": (width,)}}
  return jax.tree.map(lambda s: jnp.ones(s, jnp.float32) * 0.01, shapes,
                      is_leaf=lambda s: isinstance(s, tuple))


def time_fn(fn, *args, repeats: int) -> float:
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def update_cost(opt, params, repeats):
  state = opt.init(params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
  step = jax.jit(lambda g, s, p: opt.update(g, s, p, value=jnp.float32(1.0)))
  seconds = time_fn(step, grads, state, params, repeats=repeats)
  state_bytes = sum(l.nbytes for l in jax.tree.leaves(state))
  return seconds, state_bytes


def lo_optimizer():
  lo = metaopt.LearnedOptimizer.random(jax.random.key(0), output_scale=0.05)
  return lo.as_optax(num_steps=1000, sp=True)


def lm_step_cost(opt, repeats):
  import tasks  # pylint: disable=g-import-not-at-top
  entries = [e for e in tasks.get_suite("meta_train_default")
             if type(e.config).__name__ == "TransformerLMConfig"]
  task = entries[0].build()
  params = task.init(jax.random.key(0))
  state = opt.init(params)

  @jax.jit
  def train_step(params, state, key):
    batch = task.sample_batch(key)
    loss, grads = jax.value_and_grad(task.loss)(params, batch)
    updates, state = opt.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state

  return time_fn(train_step, params, state, jax.random.key(1), repeats=repeats), task.name


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", type=float, nargs="+", default=[1e4, 1e5, 1e6, 1e7])
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
  print("| params | adam update | LO update | ratio | adam state B/param | LO state B/param |")
  print("|---|---|---|---|---|---|")
  for size in args.sizes:
    params = mlp_params(int(size))
    n = sum(p.size for p in jax.tree.leaves(params))
    adam_s, adam_b = update_cost(optax.adam(1e-3), params, args.repeats)
    lo_s, lo_b = update_cost(lo_optimizer(), params, args.repeats)
    print(f"| {n:.2e} | {adam_s * 1e3:.3f} ms | {lo_s * 1e3:.3f} ms | {lo_s / adam_s:.1f}x "
          f"| {adam_b / n:.1f} | {lo_b / n:.1f} |")
  try:
    adam_s, name = lm_step_cost(optax.adam(1e-3), args.repeats)
    lo_s, _ = lm_step_cost(lo_optimizer(), args.repeats)
    print(f"\nwhole training step on {name} (batch from the task): adam {adam_s * 1e3:.2f} ms, "
          f"LO {lo_s * 1e3:.2f} ms, ratio {lo_s / adam_s:.2f}x")
  except (ImportError, IndexError) as e:
    print(f"(transformer LM step skipped: {e})")


if __name__ == "__main__":
  main()
