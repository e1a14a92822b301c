"""Steps/s of one AdamW training step per task, single and vmapped over 8 seeds.

Usage::

  python benchmarks/task_throughput.py [--suite meta_train_default[,heldout,...]]
      [--steps 200] [--seeds 8] [--calibrate]

For every task of the suites it times (after compiling) a ``lax.scan`` unroll of
``--steps`` AdamW steps (batch sampling + loss + grad + update, as meta-training runs
them): one seed, and ``--seeds`` seeds under ``vmap`` (steps/s counts population steps;
multiply by the seeds for member-steps/s). It prints a Markdown table with the cost
model's estimate (``tasks.cost``) beside the measurement; ``--calibrate`` also fits the
cost model's constants to the measurements by least squares.
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
import numpy as np
import optax
import scipy.optimize

import tasks
from tasks import cost
from tasks import training


def _time(fn, *args, repeats: int = 3) -> float:
  jax.block_until_ready(fn(*args))  # compile
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def measure(task: tasks.Task, steps: int, seeds: int) -> tuple[float, float]:
  """(single-seed steps/s, vmapped population steps/s) of AdamW(1e-3) on ``task``."""
  opt = optax.adamw(1e-3)
  single = jax.jit(lambda k: training.train(task, opt, k, steps)[1])
  batched = jax.jit(jax.vmap(lambda k: training.train(task, opt, k, steps)[1]))
  keys = jax.random.split(jax.random.key(0), seeds)
  return steps / _time(single, keys[0]), steps / _time(batched, keys)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--suite", default="meta_train_default",
                      help="a suite name, or several separated by commas")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--seeds", type=int, default=8)
  parser.add_argument("--calibrate", action="store_true")
  args = parser.parse_args()

  print(f"# AdamW step throughput ({platform.machine()}, {os.cpu_count()} CPUs, "
        f"{jax.devices()[0].platform}, jax {jax.__version__}, load average "
        f"{os.getloadavg()[0]:.1f})\n")
  print(f"| task | params | steps/s (1 seed) | ms/step | est. ms/step | "
        f"steps/s (vmap {args.seeds}) | member-steps/s |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  rows = []
  entries = [e for name in args.suite.split(",") for e in tasks.get_suite(name)]
  for e in entries:
    task = e.build()
    single, batched = measure(task, args.steps, args.seeds)
    est = cost.estimate_step_seconds(e.config)
    print(f"| {task.name} | {task.num_params()} | {single:.0f} | {1e3 / single:.3f} | "
          f"{1e3 * est:.3f} | {batched:.0f} | {batched * args.seeds:.0f} |", flush=True)
    rows.append((*cost.cost_features(e.config), 1.0 / single))

  if args.calibrate:
    macs, params, elements, secs = (np.array(c, np.float64) for c in zip(*rows))
    design = np.stack([np.ones_like(macs), 3 * macs, params, elements], axis=1)
    # Relative non-negative least squares: every task weighs the same whatever its cost.
    coef = scipy.optimize.nnls(design / secs[:, None], np.ones_like(secs))[0]
    print(f"\nfitted: OVERHEAD_S={coef[0]:.3g} S_PER_MAC={coef[1]:.3g} "
          f"S_PER_PARAM={coef[2]:.3g} S_PER_ELEMENT={coef[3]:.3g}")


if __name__ == "__main__":
  main()
