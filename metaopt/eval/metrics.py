"""Metric definitions (the report quotes these docstrings' rules).

* final loss: mean training loss over the last :data:`TAIL_FRACTION` of the steps.
* diverged: a non-finite loss at any step, or a final loss above the initial loss.
* beats / tie / loses: lower final loss than the baseline's best setting; a tie is a
  relative difference within :data:`TIE_TOLERANCE`.
* speedup: ``num_steps / s`` where ``s`` is the first step at which the LO's seed-mean
  loss curve (trailing mean over the final-loss window) reaches the baseline's final
  loss; when it never does, ``s' / num_steps`` where ``s'`` is when the baseline's curve
  reaches the LO's final loss (< 1).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import scipy.stats

TAIL_FRACTION = 0.05
TIE_TOLERANCE = 0.01
CURVE_POINTS = 100


def tail_length(num_steps: int, tail_fraction: float = TAIL_FRACTION) -> int:
  return max(1, int(math.ceil(tail_fraction * num_steps)))


def final_loss(losses: np.ndarray, tail_fraction: float = TAIL_FRACTION) -> float:
  """Mean of the last ``tail_fraction`` of a per-step loss curve."""
  losses = np.asarray(losses, np.float64)
  return float(np.mean(losses[-tail_length(len(losses), tail_fraction):]))


def diverged(losses: np.ndarray, tail_fraction: float = TAIL_FRACTION) -> bool:
  """NaN/inf at any step, or a final loss above the initial (first-step) loss."""
  losses = np.asarray(losses, np.float64)
  if not np.all(np.isfinite(losses)):
    return True
  return bool(final_loss(losses, tail_fraction) > losses[0])


def binned_curve(losses: np.ndarray, points: int = CURVE_POINTS
                 ) -> tuple[np.ndarray, np.ndarray]:
  """``(steps, means)``: the curve averaged over ``points`` equal bins of steps.

  ``steps[i]`` is the (1-based) last step of bin ``i``; non-finite values propagate.
  """
  losses = np.asarray(losses, np.float64)
  edges = np.linspace(0, len(losses), min(points, len(losses)) + 1).round().astype(int)
  means = np.array([losses[a:b].mean() for a, b in zip(edges[:-1], edges[1:])])
  return edges[1:], means


def steps_to_reach(steps: Sequence[int], curve: Sequence[float], target: float
                   ) -> int | None:
  """First step whose curve value is at or below ``target`` (None: never)."""
  curve = np.asarray(curve, np.float64)
  hit = np.flatnonzero(np.isfinite(curve) & (curve <= target))
  return int(np.asarray(steps)[hit[0]]) if hit.size and np.isfinite(target) else None


def trailing_mean(values: Sequence[float], window: int) -> np.ndarray:
  """Mean of the last ``window`` values at every position (fewer at the start)."""
  x = np.asarray(values, np.float64)
  c = np.concatenate([[0.0], np.cumsum(x)])
  end = np.arange(1, len(x) + 1)
  start = np.maximum(0, end - window)
  return (c[end] - c[start]) / (end - start)


def speedup(steps: Sequence[int], curve: Sequence[float], final: float,
            base_curve: Sequence[float], base_final: float, num_steps: int) -> float:
  """How much faster a curve reaches a baseline's final loss (see module docstring).

  Curves are compared through a trailing mean over :data:`TAIL_FRACTION` of their
  points, the window the final loss averages over, so a noisy dip does not count as
  reaching it. NaN when neither curve reaches the other's final loss (e.g. diverged).
  """
  window = tail_length(len(curve))
  s = steps_to_reach(steps, trailing_mean(curve, window), base_final)
  if s is not None:
    return num_steps / s
  s = steps_to_reach(steps, trailing_mean(base_curve, window), final)
  return s / num_steps if s is not None else math.nan


def outcome(loss: float, base_loss: float, tolerance: float = TIE_TOLERANCE) -> str:
  """``"win"``, ``"tie"`` or ``"loss"`` of ``loss`` against ``base_loss`` (NaN: diverged)."""
  ok, base_ok = np.isfinite(loss), np.isfinite(base_loss)
  if not ok:
    return "tie" if not base_ok else "loss"
  if not base_ok:
    return "win"
  if abs(loss - base_loss) <= tolerance * abs(base_loss):
    return "tie"
  return "win" if loss < base_loss else "loss"


def ranks(losses: Sequence[float]) -> np.ndarray:
  """Ranks (1 = lowest loss; ties share the mean rank; NaN ranks last, tied)."""
  values = np.array([v if np.isfinite(v) else np.inf for v in losses], np.float64)
  return scipy.stats.rankdata(values, method="average")


def mean_and_std(values: Sequence[float], keep: Sequence[bool]) -> tuple[float, float]:
  """Mean and std of ``values`` where ``keep`` (NaN, NaN if none is kept)."""
  kept = np.asarray(values, np.float64)[np.asarray(keep, bool)]
  if not kept.size:
    return math.nan, math.nan
  return float(kept.mean()), float(kept.std())
