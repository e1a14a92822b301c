"""Two evaluations' learned optimizers head to head, task by task (the release rule).

Usage::

  python benchmarks/ablations/head_to_head.py OLD/runs.csv NEW/runs.csv [--optimizer lo]

Reads the ``runs.csv`` that ``evaluate.py`` writes, takes each task's mean final loss
over the seeds of the named optimizer (default ``lo``, the untuned learned optimizer),
and prints one row per task with the ratio NEW / OLD, which one is lower, and the
divergences; then the count of tasks NEW wins. A diverged seed counts as a loss of that
side on the task, and a relative difference within 1% is a tie (as in the evaluation
reports).
"""

from __future__ import annotations

import argparse
import collections
import csv

import numpy as np

TIE = 0.01  # relative difference counted as a tie


def lo_results(path: str, optimizer: str) -> dict[str, tuple[float, int]]:
  """``{task: (mean final loss of the finite seeds, diverged seeds)}``."""
  losses, diverged = collections.defaultdict(list), collections.Counter()
  with open(path) as f:
    for row in csv.DictReader(f):
      if row["optimizer"] != optimizer:
        continue
      if row["diverged"] in ("True", "1", "true"):
        diverged[row["task"]] += 1
      losses[row["task"]].append(float(row["final_loss"]))
  return {t: (float(np.mean([x for x in v if np.isfinite(x)] or [np.inf])), diverged[t])
          for t, v in losses.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("old")
  parser.add_argument("new")
  parser.add_argument("--optimizer", default="lo")
  args = parser.parse_args()
  old, new = lo_results(args.old, args.optimizer), lo_results(args.new, args.optimizer)
  common = [t for t in old if t in new]
  if not common:
    raise SystemExit(f"no task of {args.old} is in {args.new}")
  print("| task | old | new | new / old | lower | diverged old / new |")
  print("|---|---|---|---|---|---|")
  outcome = collections.Counter()
  for t in common:
    (lo_old, d_old), (lo_new, d_new) = old[t], new[t]
    if d_new != d_old:
      result = "new" if d_new < d_old else "old"
    elif abs(lo_new - lo_old) <= TIE * max(abs(lo_old), abs(lo_new)):
      result = "tie"
    else:
      result = "new" if lo_new < lo_old else "old"
    outcome[result] += 1
    print(f"| {t} | {lo_old:.4g} | {lo_new:.4g} | {lo_new / lo_old:.3f} | {result} | "
          f"{d_old} / {d_new} |")
  print(f"new vs old: {outcome['new']} wins, {outcome['tie']} ties, {outcome['old']} "
        f"losses of {len(common)} tasks")


if __name__ == "__main__":
  main()
