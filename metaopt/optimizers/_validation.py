"""Hyperparameter validation shared by every optimizer factory.

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


def check_range(name: str, value, low: float | None = None, high: float | None = None,
                *, low_inclusive: bool = True, high_inclusive: bool = False) -> None:
  """Raises ValueError naming ``name`` when a concrete ``value`` leaves the range.

  Concrete values must be finite (an unbounded side means any finite value); a value
  that is not a number raises ``TypeError`` naming ``name``.
  """
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
  interval = f"{'[' if low_inclusive and low is not None else '('}{lb}, {ub}{']' if high_inclusive and high is not None else ')'}"
  raise ValueError(f"{name}={value!r} is out of range; expected a value in {interval}.")


def check_learning_rate(learning_rate, name: str = "learning_rate") -> None:
  check_range(name, learning_rate, 0.0)


def check_beta(name: str, value) -> None:
  check_range(name, value, 0.0, 1.0)


def check_positive(name: str, value) -> None:
  check_range(name, value, 0.0, low_inclusive=False)


def check_nonnegative(name: str, value) -> None:
  check_range(name, value, 0.0)


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
