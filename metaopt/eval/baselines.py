"""What is compared: optimizer name -> :class:`OptimizerSpec` (tuned, untuned or learned).

Names resolve, in order, to ``metaopt.optimizers.<name>``, ``optax.contrib.<name>`` and
``optax.<name>``; a qualified name (``"optax.adamw"``, ``"optax.contrib.prodigy"``) picks
one explicitly. A *tuned* baseline gets a log grid of learning rates around its
:data:`LR_CENTERS` entry crossed with schedules; an *untuned* one runs once per seed at
its factory's default learning rate with a constant schedule (the learning-rate-free
optimizers are meant to be used that way); the *learned* optimizer runs at learning-rate
multiplier 1 (or, reported separately, tuned on a grid around 1).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
from typing import Any, Callable

import jax
import numpy as np
import optax
import optax.contrib

from metaopt import anchors
from metaopt import optimizers as metaopt_optimizers
from metaopt.eval import sweep

# metaopt.optimizers that take (learning_rate, ...); `cautious` needs a base transform.
METAOPT_NAMES = tuple(
    name for name in metaopt_optimizers.OPTIMIZER_NAMES
    if next(iter(inspect.signature(getattr(metaopt_optimizers, name)).parameters))
    == "learning_rate")
# optax optimizers that need inputs a training loop over (params, batch) cannot give.
UNSUPPORTED_OPTAX = ("lbfgs", "dpsgd", "sophia")
# Optimizers whose parameters are evaluated at an averaged point.
EVAL_PARAMS = {"schedule_free_adamw": optax.contrib.schedule_free_eval_params,
               "schedule_free_sgd": optax.contrib.schedule_free_eval_params}
# Optimizers whose updates follow muP (by the task's roles): in the widths suite they
# run on the muP networks, the others on their SP twins.
MUP_FACTORIES = (metaopt_optimizers.mu_adamw,)

# Geometric centre of each tuned baseline's learning-rate grid (the default grid spans
# 3 decades around it: AdamW 1e-4..1e-1). Names not listed use their default lr.
LR_CENTERS = {
    "adamw": 10 ** -2.5, "mu_adamw": 10 ** -2.5, "cautious_adamw": 10 ** -2.5,
    "schedule_free_adamw": 10 ** -2.5, "adam": 10 ** -2.5, "laprop": 10 ** -2.5,
    "grams": 10 ** -2.5, "adan": 10 ** -2.5, "adamp": 10 ** -2.5, "mars_adamw": 10 ** -2.5,
    "ademamix": 10 ** -2.5, "adatam": 10 ** -2.5, "momo_adam": 10 ** -2.5,
    "lion": 10 ** -3.5, "cautious_lion": 10 ** -3.5,
    "sgdm": 10 ** -1.5, "nesterov": 10 ** -1.5, "tam": 10 ** -1.5, "sgdp": 10 ** -1.5,
    "sgd": 10 ** -1.5, "momo": 10 ** -0.5, "alr_smag": 10 ** -0.5,
    "muon": 10 ** -2,  # 3e-4..0.3: Jordan et al's 0.02 for Muon, and its AdamW part's lr
}

# Sized so that the default heldout evaluation fits in about 20 minutes on 2 CPU cores.
# Tuned Muon (`--tuned ...,muon`) is the other anchor users pick, but not a default: its
# Newton-Schulz matmuls on the 256-512 wide hidden layers multiply the heldout estimate
# by ~5 on 2 CPU cores (7.8 -> 39.9 min by harness.estimate_seconds).
DEFAULT_TUNED = ("adamw", "lion", "schedule_free_adamw")
# The untuned anchors (metaopt.anchors): Muon and AdamW at one default peak lr with
# warmup + cosine decay over the run -- the bar the LO must clear. name -> (qualified
# factory, peak lr, schedule).
ANCHORS = {
    "muon_default": ("optax.contrib.muon", anchors.MUON_LR, "warmup_cosine"),
    "adamw_cosine": ("optax.adamw", anchors.ADAMW_LR, "warmup_cosine"),
}
# AdamW at its default lr (1e-3, constant) is what a user who tunes nothing runs.
DEFAULT_UNTUNED = ("muon_default", "adamw_cosine", "adamw", "prodigy", "dadapt_adamw",
                   "momo_adam", "schedule_free_adamw")

Factory = Callable[[Any, Any], optax.GradientTransformation]


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """One compared optimizer and the settings it is run at.

  Attributes:
    label: the name in reports (``"adamw"``, ``"prodigy (default)"``, ``"lo"``).
    kind: ``"tuned"``, ``"untuned"`` or ``"learned"``.
    source: where it comes from (``"optax.contrib.prodigy"``, the LO's path).
    make: ``(learning_rate, task) -> optax transform``; ``learning_rate`` is a traced
      scalar or a schedule.
    lrs: learning rates (or LO multipliers) to run.
    schedules: schedule names (:data:`metaopt.eval.sweep.SCHEDULE_NAMES`).
    eval_params: ``(opt_state, params) -> params`` to evaluate at (Schedule-Free's
      averaged point), or None.
    scalar_lr: the factory needs a scalar learning rate (no schedule callable).
    fingerprint: hashed into cache keys; changes when the optimizer does.
    mup: it follows muP: the widths suite runs it on muP networks (else on SP ones).
  """

  label: str
  kind: str
  source: str
  make: Factory
  lrs: tuple[float, ...]
  schedules: tuple[str, ...] = ("constant",)
  eval_params: Callable | None = None
  scalar_lr: bool = False
  fingerprint: str = ""
  mup: bool = False


def optax_names() -> dict[str, str]:
  """``bare name -> qualified name`` of the optax.contrib and optax optimizers (contrib
  first when both have a name)."""
  found = {}
  for module in (optax.contrib, optax):
    for name in sorted(dir(module)):
      fn = getattr(module, name)
      if name.startswith(("_", "scale_by")) or name in UNSUPPORTED_OPTAX or \
          not inspect.isfunction(fn):
        continue
      params = list(inspect.signature(fn).parameters)
      if params and params[0] == "learning_rate":
        found.setdefault(name, f"{module.__name__}.{name}")
  return found


def valid_names() -> list[str]:
  """Every accepted bare optimizer name (``optax.<name>`` and ``optax.contrib.<name>``
  and ``metaopt.optimizers.<name>`` qualify one explicitly; :data:`ANCHORS` untuned)."""
  return sorted(set(METAOPT_NAMES) | set(optax_names()) | set(ANCHORS))


def resolve(name: str) -> tuple[str, Callable]:
  """``(qualified name, factory function)`` of an optimizer name.

  Raises:
    ValueError: listing the valid names when ``name`` is unknown.
  """
  short = name.removeprefix("metaopt.optimizers.")
  if short in METAOPT_NAMES and not name.startswith("optax"):
    return f"metaopt.optimizers.{short}", getattr(metaopt_optimizers, short)
  qualified = optax_names()
  qual = qualified.get(name, name if name in qualified.values() else None)
  if qual is None:
    raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(valid_names())} "
                     "(qualify as optax.<name> or optax.contrib.<name> to pick one).")
  module, short = qual.rsplit(".", 1)
  return qual, getattr(optax.contrib if module == "optax.contrib" else optax, short)


def _short(qualified: str) -> str:
  return qualified.rsplit(".", 1)[1]


def _factory(fn: Callable) -> Factory:
  """``(lr, task) -> transform``; a factory with a ``roles`` parameter (mu_adamw's muP
  scaling, muon's hidden matrices) is given the task's roles."""
  if "roles" in inspect.signature(fn).parameters:
    return lambda lr, task: fn(lr, roles=task.roles)
  return lambda lr, task: fn(lr)


def _needs_scalar_lr(fn: Callable) -> bool:
  """optax.contrib.schedule_free_* take a scalar learning rate, not a schedule."""
  return fn.__module__.startswith("optax") and fn.__name__.startswith("schedule_free")


def default_lr(name: str) -> float:
  """The default learning rate of an optimizer's factory (ValueError if it has none)."""
  qualified, fn = resolve(name)
  default = inspect.signature(fn).parameters["learning_rate"].default
  if default is inspect.Parameter.empty or not isinstance(default, (int, float)):
    raise ValueError(f"{qualified} has no default learning rate; tune it instead "
                     "(pass it as a tuned baseline).")
  return float(default)


def tuned(name: str, *, grid_size: int = 7, span_decades: float = 3.0,
          schedules: tuple[str, ...] = sweep.SCHEDULE_NAMES,
          center: float | None = None) -> OptimizerSpec:
  """A baseline tuned over ``lr_grid(center, grid_size, span) x schedules``, labelled
  ``name`` as given (so ``"optax.adamw"`` and ``"adamw"`` stay apart)."""
  qualified, fn = resolve(name)
  short = _short(qualified)
  if center is None:
    center = LR_CENTERS.get(short) or _signature_lr(fn) or 1e-3
  scalar = _needs_scalar_lr(fn)
  if scalar:
    schedules = ("constant",)
  for s in schedules:
    sweep.schedule_shape(s, 2)  # validates the name
  return OptimizerSpec(label=name, kind="tuned", source=qualified, make=_factory(fn),
                       lrs=sweep.lr_grid(center, grid_size, span_decades),
                       schedules=tuple(schedules), eval_params=EVAL_PARAMS.get(short),
                       scalar_lr=scalar, fingerprint=qualified, mup=fn in MUP_FACTORIES)


def untuned(name: str) -> OptimizerSpec:
  """A baseline at its factory's defaults (constant schedule), labelled ``(default)``;
  or an :data:`ANCHORS` entry at its default peak lr and schedule, labelled by name."""
  if name in ANCHORS:
    qualified, lr, schedule = ANCHORS[name]
    fn = resolve(qualified)[1]
    return OptimizerSpec(label=name, kind="untuned", source=qualified, make=_factory(fn),
                         lrs=(lr,), schedules=(schedule,),
                         fingerprint=f"{qualified}:{schedule}")
  qualified, fn = resolve(name)
  short = _short(qualified)
  return OptimizerSpec(label=f"{name} (default)", kind="untuned", source=qualified,
                       make=_factory(fn), lrs=(default_lr(name),),
                       eval_params=EVAL_PARAMS.get(short), scalar_lr=_needs_scalar_lr(fn),
                       fingerprint=qualified, mup=fn in MUP_FACTORIES)


def _signature_lr(fn: Callable) -> float | None:
  default = inspect.signature(fn).parameters["learning_rate"].default
  return float(default) if isinstance(default, (int, float)) and default > 0 else None


def learned(lo: Any, *, label: str = "lo", lrs: tuple[float, ...] = (1.0,),
            sp: bool = False, mup: bool = True) -> OptimizerSpec:
  """The learned optimizer ``lo`` given ``num_steps`` and the task's muP roles.

  Args:
    lo: a :class:`metaopt.LearnedOptimizer`.
    label: its name in reports.
    lrs: learning-rate multipliers (``(1.0,)``: untuned).
    sp: run it with muP scaling off.
    mup: the widths suite runs it on muP networks (False: on their SP twins, as for an
      LO meta-trained without muP).
  """
  def make(lr, task):
    schedule = lr if callable(lr) else (lambda count: lr)  # callables skip value checks
    return lo.as_optax(num_steps=task.num_steps, learning_rate=schedule,
                       roles=task.roles, sp=sp)

  return OptimizerSpec(label=label, kind="learned", source=str(lo.metadata.get(
      "path", lo.metadata.get("from_classical", "in-memory learned optimizer"))),
                       make=make, lrs=tuple(float(v) for v in lrs),
                       fingerprint=f"lo:{theta_digest(lo)}:sp={sp}", mup=mup)


def theta_digest(lo: Any) -> str:
  """A short hash of a learned optimizer's config and theta (cache identity)."""
  h = hashlib.sha256(json.dumps(lo.config.to_dict(), sort_keys=True).encode())
  for key in sorted(lo.theta):
    h.update(key.encode())
    h.update(np.asarray(jax.device_get(lo.theta[key]), np.float32).tobytes())
  return h.hexdigest()[:16]
