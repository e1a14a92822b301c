"""Hyperparameter validation shared by every optimizer factory and ``LOConfig``.

One style: each check takes the hyperparameters as keywords (``check_betas(b1=b1,
b2=b2)``) and raises a one-line ``ValueError`` naming the bad one, its value and the
expected range: ``b1=1.5 is out of range; expected a value in [0, 1).``

Only concrete values are checked: schedules (callables) and traced values (under
``optax.inject_hyperparams``, ``jit`` or ``vmap``) pass through untouched, so the
factories stay usable inside meta-learning code.
"""

from __future__ import annotations

import numbers

import jax
import numpy as np


def concrete_value(value):
  """Returns a Python float for concrete scalars, None for schedules and tracers.

  Raises ``TypeError`` naming the value for what is neither a number, a numeric array
  nor a schedule (``"0.1"``, ``None`` where a number belongs), instead of letting it
  fail deep inside JAX at the first update.
  """
  if callable(value) or isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, numbers.Real):
    return float(value)
  try:
    arr = np.asarray(value)
  except Exception:  # pylint: disable=broad-except
    arr = None
  if arr is None or arr.dtype.kind not in "fiub":
    raise TypeError(f"{value!r} ({type(value).__name__}) is not a number; expected a "
                    "float, a numeric array or an optax schedule.")
  return float(arr) if arr.shape == () else None


def _check_in(name: str, value, low: float | None, high: float | None,
              low_inclusive: bool, high_inclusive: bool) -> None:
  """Raises ValueError naming ``name``, its value and the range when a concrete
  ``value`` leaves the range (or is not finite); TypeError for what is not a number."""
  try:
    v = concrete_value(value)
  except TypeError as e:
    raise TypeError(f"{name}={e}") from None
  if v is None:
    return
  lo_ok = low is None or (v >= low if low_inclusive else v > low)
  hi_ok = high is None or (v <= high if high_inclusive else v < high)
  if lo_ok and hi_ok and np.isfinite(v):
    return
  lb = "-inf" if low is None else f"{low:g}"
  ub = "inf" if high is None else f"{high:g}"
  interval = (f"{'[' if low_inclusive and low is not None else '('}{lb}, "
              f"{ub}{']' if high_inclusive and high is not None else ')'}")
  raise ValueError(f"{name}={value!r} is out of range; expected a value in {interval}.")


def check_range(low: float | None = None, high: float | None = None, *,
                low_inclusive: bool = True, high_inclusive: bool = False,
                **values) -> None:
  """Each keyword's concrete value must lie between ``low`` and ``high`` (None:
  unbounded; by default ``[low, high)``) and be finite.

  Example: ``check_range(0.0, 1.0, high_inclusive=True, dampening=dampening)``.
  """
  for name, value in values.items():
    _check_in(name, value, low, high, low_inclusive, high_inclusive)


def check_betas(**values) -> None:
  """Each keyword's concrete value (a decay or an interpolation) must lie in [0, 1)."""
  check_range(0.0, 1.0, **values)


def check_positive(**values) -> None:
  """Each keyword's concrete value must lie in (0, inf)."""
  check_range(0.0, low_inclusive=False, **values)


def check_nonnegative(**values) -> None:
  """Each keyword's concrete value (learning rates, weight decays, ...) must lie in
  [0, inf)."""
  check_range(0.0, **values)


def require_value(value, optimizer: str):
  """Raises a clear error for loss-based optimizers called without ``value=``."""
  if value is None:
    raise ValueError(
        f"{optimizer} needs the current loss: call "
        f"`opt.update(grads, state, params, value=loss)` (use jax.value_and_grad).")
  return value


def require_params(params, optimizer: str):
  if params is None:
    raise ValueError(f"{optimizer} needs the parameters: call "
                     "`opt.update(grads, state, params)`.")
  return params
