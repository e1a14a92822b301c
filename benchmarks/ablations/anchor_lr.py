"""Scores (optimizer, schedule, lr) settings across tasks by the rule of release_030.md.

Per task, each setting's mean final loss over seeds is divided by the best such mean on
that task over every setting scored; a setting's score is the geometric mean of that
ratio over the tasks (lower is better; 1.0: best on every task). A setting with any
diverged run, or missing on a task, is ineligible.

  python benchmarks/ablations/anchor_lr.py runs/anchor_validation/runs.csv \
      runs/anchor_validation-user/runs.csv --optimizers optax.contrib.muon,muon \
      --json benchmarks/ablations/anchor_lr.json
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import math
import sys


def settings_scores(rows: list[dict], optimizers: set[str]) -> tuple[list[dict], list[str]]:
  """``(scored settings sorted best first, task names)`` from runs.csv rows."""
  runs = collections.defaultdict(list)  # (opt, schedule, lr) -> task -> [(loss, div)]
  for r in rows:
    if r["optimizer"] in optimizers:
      key = (r["optimizer"], r["schedule"], float(r["lr"]))
      runs[key].append((r["task"], float(r["final_loss"]), r["diverged"] == "True"))
  tasks = sorted({t for v in runs.values() for t, _, _ in v})
  means, eligible = {}, {}
  for key, items in runs.items():
    per_task = collections.defaultdict(list)
    for task, loss, diverged in items:
      per_task[task].append((loss, diverged))
    eligible[key] = set(per_task) == set(tasks) and not any(
        d or not math.isfinite(l) for v in per_task.values() for l, d in v)
    means[key] = {t: sum(l for l, _ in v) / len(v) for t, v in per_task.items()}
  best = {t: min(m[t] for k, m in means.items() if eligible[k] and t in m) for t in tasks}
  scored = []
  for key, m in means.items():
    ratios = {t: m[t] / best[t] for t in tasks if t in m}
    score = math.exp(sum(math.log(r) for r in ratios.values()) / len(ratios)) if (
        eligible[key]) else math.inf
    scored.append({"optimizer": key[0], "schedule": key[1], "lr": key[2],
                   "eligible": eligible[key], "score": score,
                   "ratio": {t: round(r, 4) for t, r in ratios.items()},
                   "mean_final_loss": m})
  scored.sort(key=lambda s: (s["score"], s["lr"]))
  return scored, tasks


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("csv", nargs="+")
  p.add_argument("--optimizers", required=True, help="comma-separated labels to score")
  p.add_argument("--json", default=None, help="write the scores here")
  args = p.parse_args(argv)
  rows = []
  for path in args.csv:
    with open(path, newline="") as f:
      rows += list(csv.DictReader(f))
  scored, tasks = settings_scores(rows, set(args.optimizers.split(",")))
  if not scored:
    print(f"no runs of {args.optimizers} in {args.csv}", file=sys.stderr)
    return 2
  print(f"{len(tasks)} tasks; score = geometric mean of final loss / best per task")
  for s in scored:
    flag = "" if s["eligible"] else "  (ineligible: diverged or missing)"
    print(f"  {s['optimizer']:>20s} {s['schedule']:>14s} lr={s['lr']:<8.4g} "
          f"score={s['score']:.4f}{flag}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"tasks": tasks, "settings": scored}, f, indent=1, sort_keys=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
