"""Writes the uniform average of a run's checkpointed thetas as an artifact.

Usage::

  python benchmarks/ablations/average_thetas.py RUN STEPS OUT

Polyak averaging of the outer iterates (Polyak & Juditsky, "Acceleration of stochastic
approximation by averaging", 1992): ``theta_bar = (1/K) sum_k theta_{s_k}`` over the
checkpoints ``STEPS`` (comma-separated) of the run ``RUN``, all of one LOConfig. Score
it beside the run's checkpoints with ``score_run.py RUN STEPS --artifact avg=OUT``.
"""

from __future__ import annotations

import argparse
import os
import sys

# Runnable from a clone without `pip install -e .` (as score_run.py).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np

import metaopt
from metaopt.meta import run


def average(run_dir: str, steps: list[int]) -> metaopt.LearnedOptimizer:
  """The LO whose theta is the mean of the run's thetas at ``steps``."""
  los = [run.checkpoint_lo(run_dir, step)[0] for step in steps]
  if any(lo.config != los[0].config for lo in los):
    raise SystemExit(f"checkpoints {steps} of {run_dir} differ in LOConfig")
  theta = {k: np.mean([lo.theta[k] for lo in los], axis=0, dtype=np.float64)
              .astype(np.float32) for k in los[0].theta}
  return los[0].with_theta(theta)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("run_dir")
  parser.add_argument("steps", help="comma-separated checkpoint steps")
  parser.add_argument("out")
  args = parser.parse_args()
  steps = [int(s) for s in args.steps.split(",")]
  lo = average(args.run_dir, steps)
  metaopt.checkpoint.save(lo, args.out, meta_training={
      "averaged": {"run": os.path.abspath(args.run_dir), "steps": steps}})
  print(f"wrote {args.out}: the mean of {len(steps)} thetas of {args.run_dir}")


if __name__ == "__main__":
  main()
