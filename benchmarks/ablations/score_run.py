"""Scores a run's warm start (as step 0) and checkpoints on its selection suites.

Usage::

  python benchmarks/ablations/score_run.py RUN STEPS [--json OUT.json] [--lo-set F=V]
      [--artifact LABEL=PATH ...]

The same scores as ``meta_train.py --out RUN --score STEPS`` (``validation.score_thetas``
on ``MetaConfig.selection_suites``: informed runs, 2 seeds, log meta-objective, lower is
better), with the warm start added as step 0 (a run keeps no checkpoint of it). Every
theta is scored in one call, so each task compiles once. Prints the per-task table and,
per step, the mean over tasks (the selection rule: the lowest mean wins) and the mean and
worst difference to step 0.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

# Runnable from a clone without `pip install -e .`: the repository root goes first on
# the import path, so the script imports this checkout's metaopt and tasks.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np

import metaopt
from metaopt.meta import config as config_lib
from metaopt.meta import outer
from metaopt.meta import run
from metaopt.meta import validation


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("run_dir")
  parser.add_argument("steps", help="comma-separated checkpoint steps (0: the warm start)")
  parser.add_argument("--json", default=None, help="also write {task: {step: score}} here")
  parser.add_argument("--lo-set", action="append", default=[], metavar="FIELD=VALUE",
                      help="score under the run's LOConfig with FIELD changed (VALUE "
                      "as for meta_train.py --set; theta's shapes must not change), e.g. "
                      "warmup_fraction=0.05")
  parser.add_argument("--artifact", action="append", default=[], metavar="LABEL=PATH",
                      help="also score this LO artifact (same LOConfig as the run's) "
                      "under LABEL, e.g. avg=runs/avg")
  args = parser.parse_args()
  run_dir = pathlib.Path(args.run_dir)
  config = config_lib.MetaConfig.from_dict(
      json.loads((run_dir / run.CONFIG_FILE).read_text()))
  warm = outer.warm_start(config)

  def theta_of(lo, what: str):
    if lo.config != warm.config:
      raise SystemExit(f"{what} has another LOConfig than the run's warm start")
    return lo.theta

  thetas = {}
  for step in (int(s) for s in args.steps.split(",")):
    thetas[str(step)] = warm.theta if step == 0 else theta_of(
        run.checkpoint_lo(run_dir, step)[0], f"checkpoint {step}")
  for spec in args.artifact:
    label, sep, path = spec.partition("=")
    if not sep or not label or not path:
      raise SystemExit(f"--artifact {spec!r}: expected LABEL=PATH")
    thetas[label] = theta_of(metaopt.load(path), f"--artifact {path}")
  try:
    lo_config = warm.with_config(**config_lib.parse_overrides(args.lo_set)).config
  except (TypeError, ValueError) as e:
    raise SystemExit(f"--lo-set: {e}") from None
  entries = validation.selection_entries(config.selection_suites)
  scores = validation.score_thetas(lo_config, thetas, entries)
  labels = list(thetas)
  shown = {k: f"step {k}" if k.isdigit() else k for k in labels}
  print("| task | " + " | ".join(shown[k] for k in labels) + " |")
  print("|---" * (len(labels) + 1) + "|")
  for name, row in scores.items():
    print(f"| {name} | " + " | ".join(f"{row[k]:.4f}" for k in labels) + " |")
  print("| **mean** | " + " | ".join(
      f"**{np.mean([row[k] for row in scores.values()]):.4f}**" for k in labels) + " |")
  first = labels[0]
  for k in labels:
    diffs = [row[k] - row[first] for row in scores.values()]
    print(f"{shown[k]}: mean {np.mean(diffs):+.4f}, worst {np.max(diffs):+.4f} vs {shown[first]}")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(scores, indent=1) + "\n")


if __name__ == "__main__":
  main()
