"""Configuration of the learned optimizer: hyperparameters of its state and network.

Everything here is static (shapes, decays, eps): it fixes what the optimizer state holds
and which features the per-parameter MLP reads. What meta-training learns is ``theta``
(see :mod:`metaopt.lopt._network`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from typing import Any

from metaopt.lopt._switches import SWITCHES, Switch
from metaopt.lopt._switches.muon import MUON_CANDIDATES, MUON_FEATURES, MUON_MATRICES  # pylint: disable=unused-import
from metaopt.lopt._switches.step_size import STEP_SIZE_FEATURES  # pylint: disable=unused-import
from metaopt.optimizers import _validation

# Per-parameter features, RMS-normalized per tensor before entering the MLP.
NORMALIZED_FEATURES = (
    "grad",
    "param",
    "momentum_fast",
    "momentum_mid",
    "momentum_slow",
    "rsqrt_second_moment",
    "adam",
    "adafactor_grad",
    "adafactor_momentum",
    "tam_momentum",
    "laprop",
    "lion_sign",
    "cautious_adam",
    "grams",
    "ademamix",
)
# Per-parameter features that are already bounded (not normalized).
BOUNDED_FEATURES = ("cautious_agreement",)
# Per-tensor or global scalars broadcast to every parameter of a tensor.
TENSOR_FEATURES = (
    "tam_damping",
    "polyak_ratio",
    "has_loss",
    "log_param_rms",
    "log_grad_rms",
)
TIME_FEATURES = (
    "tanh_t_10",
    "tanh_t_100",
    "tanh_t_1000",
    "tanh_t_10000",
    "fraction_of_training",
    "has_horizon",
)
FEATURE_NAMES = NORMALIZED_FEATURES + BOUNDED_FEATURES + TENSOR_FEATURES + TIME_FEATURES
TIME_TAUS = (10.0, 100.0, 1000.0, 10000.0)
HORIZON_DECAYS = ("none", "linear", "warmup_cosine")

# Classical candidate directions the LO mixes (built from raw, unnormalized state).
CANDIDATE_NAMES = (
    "sgdm",
    "adam",
    "lion",
    "cautious_adam",
    "tam",
    "adatam",
    "ademamix",
    "momo_adam",
    "grams",
    "laprop",
    "weight_decay",
)
# The optional features (switches: Muon's candidate, the step-size features, ...) append
# their features and candidates after these, and their fields after LOConfig's: each is
# declared by its module in metaopt.lopt._switches and registered in SWITCHES.


def _with_switch_fields(cls):
  """``cls`` with each switch's bool and fields appended (off and at their defaults),
  its config properties, and its attributes documented."""
  for switch in SWITCHES:
    for name, kind, default in [(switch.name, "bool", False)] + [
        (f.name, f.type, f.default) for f in switch.fields]:
      cls.__annotations__[name] = kind
      setattr(cls, name, default)
    for name, fn in switch.config_properties.items():
      setattr(cls, name, property(fn))
  cls.__doc__ = cls.__doc__.rstrip() + "\n" + "".join(s.doc for s in SWITCHES)
  return cls


@dataclasses.dataclass(frozen=True)
@_with_switch_fields
class LOConfig:
  """Static configuration of a :class:`~metaopt.lopt.LearnedOptimizer`.

  Attributes:
    hidden_size: hidden units of the per-parameter MLP (features -> hidden -> 2).
    momentum_decays: decays of the fast, mid and slow momentum EMAs. The fast EMA is
      Adam's/MoMo's first moment and SGD-M's momentum; the mid one is Lion's; the slow
      one is AdEMAMix's.
    second_moment_decay: Adam's b2 (shared by every adaptive candidate).
    factored_decay: decay of the Adafactor row/column accumulators.
    adam_eps: eps of Adam, cautious Adam, AdEMAMix and MoMo-Adam.
    lion_b1: Lion's interpolation factor.
    tam_beta, tam_gamma, tam_eps: TAM's momentum, cosine smoothing and damping floor.
    adatam_eps: AdaTAM's denominator eps.
    ademamix_alpha: AdEMAMix's mixing coefficient of the slow EMA.
    momo_alpha, momo_lower_bound: MoMo-Adam's step cap and loss lower bound f*.
    grams_eps: Grams' eps.
    laprop_b1, laprop_eps: LaProp's momentum and eps.
    step_mult: lambda1, the scale of the MLP's direction output.
    log_step_mult: lambda2, the scale of the MLP's log-magnitude output.
    max_log_step: bound on |lambda2 * m|: the MLP can scale a step by at most
      e^max_log_step either way (10 let a meta-trained LO multiply steps by e^10 on
      tasks unlike its training tasks and diverge).
    feature_clip: bound on each RMS-normalized feature. A tensor whose statistic is
      concentrated on a few entries (dead units, unused embeddings) otherwise feeds the
      MLP values up to sqrt(size), far outside anything seen in meta-training.
    horizon_decay: ``"linear"`` multiplies every update by ``1 - (t - 1) / num_steps``
      when ``num_steps`` is given (``"none"``: never), and by ``1 / num_steps`` (the
      last step's factor) after ``num_steps``: training past the horizon continues
      slowly instead of freezing. An LO meta-trained on short
      truncations with a linear meta-objective descends fast and then stalls at its
      noise floor; decaying to zero over the known horizon, as tuned schedules do,
      removes the stall (validation tasks: final loss 0.18 -> 0.003 on a 256-wide MLP).
      ``"warmup_cosine"``: optax's ``warmup_cosine_decay_schedule`` over ``num_steps``
      (linear warmup over ``W = max(1, round(warmup_fraction * num_steps))`` steps from
      0, then cosine decay to 0; :func:`metaopt.lopt._update.warmup_cosine_multiplier`),
      the schedule Muon and AdamW are run with by default, holding its last value past
      ``num_steps``.
    warmup_fraction: when ``num_steps`` is given, the first ``warmup_fraction *
      num_steps`` steps multiply every update by ``t / (warmup_fraction * num_steps)``
      (a linear warmup, as tuned AdamW schedules start; 0: none). Applied on top of
      ``horizon_decay``; without ``num_steps`` there is no warmup. With
      ``horizon_decay="warmup_cosine"`` it is that schedule's warmup fraction instead
      (not applied a second time).
    mup: scale hidden-layer updates by base_fan_in / fan_in.
    base_fan_in: the hidden width the LO was meta-trained at; used as the base of
      hidden/output roles given by labels or guessed by the fallback.

  Then each switch's bool and fields (:data:`metaopt.lopt._switches.SWITCHES`):
  """

  hidden_size: int = 8
  momentum_decays: tuple[float, float, float] = (0.9, 0.99, 0.9999)
  second_moment_decay: float = 0.999
  factored_decay: float = 0.999
  adam_eps: float = 1e-8
  lion_b1: float = 0.9
  tam_beta: float = 0.9
  tam_gamma: float = 0.9
  tam_eps: float = 1e-8
  adatam_eps: float = 1e-8
  ademamix_alpha: float = 5.0
  momo_alpha: float = 1e-2
  momo_lower_bound: float = 0.0
  grams_eps: float = 1e-6
  laprop_b1: float = 0.9
  laprop_eps: float = 1e-15
  step_mult: float = 1.0
  log_step_mult: float = 1.0
  max_log_step: float = 3.0
  feature_clip: float = 5.0
  horizon_decay: str = "none"
  warmup_fraction: float = 0.0
  mup: bool = True
  base_fan_in: int = 64

  def __post_init__(self):
    # Types first (a config read from JSON may hold anything), then ranges: the same
    # checks for construction and for metaopt.load, which builds the config from JSON.
    for name in ("hidden_size", "base_fan_in") + tuple(
        f.name for s in SWITCHES for f in s.fields if f.type == "int"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}; expected a positive int.")
    for name in ("mup",) + tuple(switch.name for switch in SWITCHES):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name}={getattr(self, name)!r}; expected True or False.")
    if not isinstance(self.horizon_decay, str) or self.horizon_decay not in HORIZON_DECAYS:
      raise ValueError(f"horizon_decay={self.horizon_decay!r}; expected one of "
                       f"{HORIZON_DECAYS}.")
    if not isinstance(self.momentum_decays, (tuple, list)) or len(self.momentum_decays) != 3:
      raise ValueError(f"momentum_decays={self.momentum_decays!r}; expected 3 decays.")
    for i, d in enumerate(self.momentum_decays):
      _check_real(f"momentum_decays[{i}]", d)
    decays = tuple(float(d) for d in self.momentum_decays)
    object.__setattr__(self, "momentum_decays", decays)
    for f in dataclasses.fields(self):
      if f.type in ("float", float):
        _check_real(f.name, getattr(self, f.name))
    _validation.check_betas(
        **{name: getattr(self, name) for name in (
            "second_moment_decay", "factored_decay", "lion_b1", "tam_beta", "tam_gamma",
            "laprop_b1")},
        **{f"momentum_decays[{i}]": d for i, d in enumerate(decays)})
    _validation.check_positive(**{name: getattr(self, name) for name in (
        "adam_eps", "tam_eps", "adatam_eps", "grams_eps", "laprop_eps", "momo_alpha",
        "max_log_step", "feature_clip")})
    _validation.check_range(0.0, 1.0, warmup_fraction=self.warmup_fraction)
    _validation.check_nonnegative(ademamix_alpha=self.ademamix_alpha,
                                  step_mult=self.step_mult,
                                  log_step_mult=self.log_step_mult)
    for switch in SWITCHES:  # its fields' ranges, on or off (they are saved either way)
      switch.validate(self)

  @property
  def feature_names(self) -> tuple[str, ...]:
    """The MLP's inputs, in the order of the rows of ``theta["w1"]``."""
    return FEATURE_NAMES + sum((s.features for s in self.switches_on), ())

  @property
  def candidate_names(self) -> tuple[str, ...]:
    """The classical directions, in the order of ``theta["mix"]``."""
    return CANDIDATE_NAMES + sum((s.candidates for s in self.switches_on), ())

  @property
  def switches_on(self) -> tuple[Switch, ...]:
    """The optional features turned on, in :data:`SWITCHES` order."""
    return tuple(s for s in SWITCHES if getattr(self, s.name))

  @property
  def num_features(self) -> int:
    return len(self.feature_names)

  def to_dict(self) -> dict[str, Any]:
    """The fields as JSON values. Each switch's fields (muon, step size, warmup) are
    left out while they all hold their defaults (the switch off): such a config writes
    the JSON it wrote before the switch existed (and reads back the same)."""
    d = dataclasses.asdict(self)
    d["momentum_decays"] = list(self.momentum_decays)
    defaults = {f.name: f.default for f in dataclasses.fields(self)}
    for group in [(s.name,) + tuple(f.name for f in s.fields) for s in SWITCHES] + [
        _WARMUP_FIELDS]:
      if all(d[k] == defaults[k] for k in group):
        for k in group:
          del d[k]
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "LOConfig":
    if not isinstance(d, dict):
      raise ValueError(f"LOConfig expects a JSON object of fields; got "
                       f"{type(d).__name__} {_short(d)}.")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown LOConfig fields {unknown}; expected a subset of "
                       f"{sorted(known)}.")
    return cls(**d)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), sort_keys=True)


_WARMUP_FIELDS = ("warmup_fraction",)


def _short(value: Any, limit: int = 60) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit] + "..."


def _check_real(name: str, value: Any) -> None:
  """A finite real number (int or float; not a bool, a string or a container)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
      not math.isfinite(value):
    raise ValueError(f"{name}={_short(value)}; expected a finite number.")
