"""Learning-rate grids, schedule shapes and picking the best tuned setting.

A tuned baseline runs every (schedule, learning rate) of ``schedules x lr_grid`` on every
seed; :func:`best_setting` picks the setting with the lowest mean final loss among those
where no seed diverged (ties in divergence are broken by loss, so a setting where every
seed diverged is chosen only when all did).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import jax.numpy as jnp
import numpy as np
import optax

from metaopt import anchors

# A schedule shape: count -> multiplier of the peak learning rate.
ScheduleShape = Callable[[jnp.ndarray], jnp.ndarray]

SCHEDULE_NAMES = ("constant", "warmup_cosine")


def schedule_shape(name: str, num_steps: int, warmup_fraction: float = 0.05
                   ) -> ScheduleShape:
  """``count -> multiplier`` of the peak learning rate for a named schedule.

  ``constant``: 1. ``warmup_cosine``: linear warmup from 0 over ``warmup_fraction`` of
  the steps, then cosine decay to 0 at ``num_steps`` (``optax.warmup_cosine_decay_schedule``).
  """
  if name == "constant":
    return lambda count: jnp.ones([], jnp.float32)
  if name == "warmup_cosine":
    return anchors.warmup_cosine(1.0, num_steps, warmup_fraction)
  raise ValueError(f"unknown schedule {name!r}; expected one of {list(SCHEDULE_NAMES)}.")


def lr_grid(center: float, size: int = 7, span_decades: float = 3.0) -> tuple[float, ...]:
  """``size`` log-spaced learning rates spanning ``span_decades`` around ``center``."""
  if size < 1 or not center > 0 or span_decades < 0:
    raise ValueError(f"lr_grid(center={center}, size={size}, span={span_decades}): "
                     "expected center > 0, size >= 1, span >= 0.")
  if size == 1:
    return (float(center),)
  exps = np.linspace(-span_decades / 2, span_decades / 2, size) + math.log10(center)
  return tuple(float(f"{10 ** e:.4g}") for e in exps)


def ranked_settings(settings: Iterable[tuple[object, float, float]]) -> list[object]:
  """Setting keys ordered by (fewest diverged seeds, lowest mean final loss).

  Args:
    settings: ``(key, diverged_fraction, mean_final_loss)`` triples; a NaN loss (every
      seed diverged) sorts last.
  """
  def order(item):
    _, frac, loss = item
    return (frac, loss if np.isfinite(loss) else math.inf)
  return [key for key, _, _ in sorted(settings, key=order)]


def best_setting(settings: Iterable[tuple[object, float, float]]) -> object | None:
  """The first of :func:`ranked_settings` (None for no settings)."""
  ranked = ranked_settings(settings)
  return ranked[0] if ranked else None


def on_grid_edge(lr: float, grid: Sequence[float]) -> bool:
  """Whether a chosen lr is the smallest or largest of a grid with > 2 values."""
  return len(grid) > 2 and (lr <= min(grid) or lr >= max(grid))
