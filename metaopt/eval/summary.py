"""From per-run records to per-setting statistics, chosen settings and comparisons.

A *record* is one training run (a dict; see :func:`metaopt.eval.harness.run_record`). A
*setting* is (task, optimizer, schedule, lr) over its seeds. Diverged seeds are counted,
never averaged: a setting's loss statistics are over its non-diverged seeds, and a
setting with diverged seeds ranks after every setting without (see
:func:`metaopt.eval.sweep.ranked_settings`).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics
from typing import Iterable, Sequence

import numpy as np

from metaopt.eval import metrics
from metaopt.eval import sweep


@dataclasses.dataclass(frozen=True)
class SettingStats:
  """One (task, optimizer, schedule, lr) over its seeds."""

  task: str
  optimizer: str
  kind: str
  schedule: str
  lr: float
  seeds: int
  diverged: int
  final_mean: float
  final_std: float
  test_loss: float
  test_accuracy: float
  ms_per_step: float
  curve_steps: tuple[int, ...]
  curve: tuple[float, ...]
  num_steps: int

  @property
  def diverged_fraction(self) -> float:
    return self.diverged / self.seeds


def _nanmean(values: Iterable[float]) -> float:
  arr = np.asarray(list(values), np.float64)
  arr = arr[np.isfinite(arr)]
  return float(arr.mean()) if arr.size else math.nan


def setting_stats(records: Sequence[dict]) -> list[SettingStats]:
  """Groups records by setting (in first-seen order) and aggregates over seeds."""
  groups = collections.defaultdict(list)
  for r in records:
    groups[(r["task"], r["optimizer"], r["schedule"], float(r["lr"]))].append(r)
  out = []
  for (task, optimizer, schedule, lr), runs in groups.items():
    keep = [not r["diverged"] for r in runs]
    mean, std = metrics.mean_and_std([r["final_loss"] for r in runs], keep)
    kept = [r for r, k in zip(runs, keep) if k] or runs
    curve = np.mean(np.asarray([r["curve"] for r in kept], np.float64), axis=0)
    out.append(SettingStats(
        task=task, optimizer=optimizer, kind=runs[0]["kind"], schedule=schedule, lr=lr,
        seeds=len(runs), diverged=len(runs) - sum(keep), final_mean=mean, final_std=std,
        test_loss=_nanmean(r["test_loss"] for r, k in zip(runs, keep) if k),
        test_accuracy=_nanmean(r["test_accuracy"] for r, k in zip(runs, keep) if k),
        ms_per_step=_nanmean(r["ms_per_step"] for r in runs),
        curve_steps=tuple(runs[0]["curve_steps"]), curve=tuple(curve.tolist()),
        num_steps=int(runs[0]["num_steps"])))
  return out


def chosen_settings(stats: Sequence[SettingStats]) -> dict[tuple[str, str], SettingStats]:
  """``(task, optimizer) -> the reported setting``: the best of those run on the most
  seeds (a tuned baseline's confirmed finalists; the one setting of the others)."""
  by_pair = collections.defaultdict(list)
  for s in stats:
    by_pair[(s.task, s.optimizer)].append(s)
  out = {}
  for pair, settings in by_pair.items():
    most = max(s.seeds for s in settings)
    candidates = [s for s in settings if s.seeds == most]
    out[pair] = sweep.best_setting((s, s.diverged_fraction, s.final_mean)
                                   for s in candidates)
  return out


def reported_loss(s: SettingStats) -> float:
  """The loss a setting is compared by: NaN when any seed diverged."""
  return s.final_mean if s.diverged == 0 else math.nan


def outcomes(chosen: dict[tuple[str, str], SettingStats], learned: str, baseline: str
             ) -> dict[str, str]:
  """``task -> "win"/"tie"/"loss"`` of ``learned`` against ``baseline``."""
  tasks = sorted({t for t, o in chosen if o == learned} & {t for t, o in chosen if o == baseline})
  return {t: metrics.outcome(reported_loss(chosen[(t, learned)]),
                             reported_loss(chosen[(t, baseline)])) for t in tasks}


def speedup(chosen: dict[tuple[str, str], SettingStats], task: str, learned: str,
            baseline: str) -> float:
  """:func:`metaopt.eval.metrics.speedup` of ``learned`` over ``baseline`` on ``task``."""
  a, b = chosen.get((task, learned)), chosen.get((task, baseline))
  if a is None or b is None:
    return math.nan
  return metrics.speedup(a.curve_steps, a.curve, reported_loss(a), b.curve,
                         reported_loss(b), a.num_steps)


def task_ranks(chosen: dict[tuple[str, str], SettingStats]) -> dict[str, dict[str, float]]:
  """``task -> {optimizer: rank}`` (1 = lowest reported loss; diverged rank last)."""
  out = {}
  for task in dict.fromkeys(t for t, _ in chosen):
    names = [o for t, o in chosen if t == task]
    ranks = metrics.ranks([reported_loss(chosen[(task, o)]) for o in names])
    out[task] = dict(zip(names, (float(r) for r in ranks)))
  return out


def average_ranks(chosen: dict[tuple[str, str], SettingStats]) -> dict[str, float]:
  """``optimizer -> mean rank over the tasks it ran on``, best first."""
  per_opt = collections.defaultdict(list)
  for ranks in task_ranks(chosen).values():
    for name, r in ranks.items():
      per_opt[name].append(r)
  return dict(sorted(((n, statistics.fmean(v)) for n, v in per_opt.items()),
                     key=lambda kv: kv[1]))
