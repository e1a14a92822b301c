"""The meta-training configuration: one frozen dataclass, named presets, JSON files.

A config is plain data (no callables, nothing global): ``meta_train.py --config NAME``
picks a preset from :data:`PRESETS`, ``--config FILE`` reads the JSON of the dataclass
(every field optional; unknown fields are an error). The format is documented in
``docs/meta_training.md``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

ESTIMATOR_NAMES = ("pes", "es", "tbptt")
HORIZON_SCHEDULES = ("constant", "log_uniform")
META_OBJECTIVES = ("linear", "log")
# Per-tensor reparametrization scales 10^U(-a, a) with a <= 6: a gradient s * g and its
# square (s^2 g^2, in the LO's second moments) stay far inside float32's range
# (1e-38..3e38) for any g a bounded loss produces; divergence is the loss bound's job.
MAX_AUGMENT_SCALE = 6.0


@dataclasses.dataclass(frozen=True)
class MetaConfig:
  """Everything that defines a meta-training run.

  Attributes:
    suite: the ``tasks.get_suite`` name the populations are drawn from (``""``: none;
      the run's tasks are then ``tasks``, ``families`` and ``task_factories``).
    task_names: keep only these tasks of the suite (empty: all of them).
    tasks: task configs as JSON strings (``tasks.config_to_json``). In a config file
      each may also be the JSON object itself.
    families: ``tasks.get_family`` names; ``family_samples`` configs are drawn from each
      (from ``seed``) when the run starts. ``tasks`` and ``families`` together, when
      either is given, replace the suite (unless ``keep_suite``).
    family_samples: configs drawn per family; with ``family_pool``, the configs of each
      family trained at once.
    keep_suite: with ``tasks`` or ``families``, train the suite's tasks as well (first).
    family_pool: K > 0 draws K configs per family when the run starts and trains
      ``family_samples`` of them at a time, redrawn every ``family_window`` outer steps
      (:func:`metaopt.meta.outer.active_tasks`); 0 trains every drawn config every step.
    family_window: outer steps between redraws of the families' active configs (0: the
      longest episode, ``ceil(horizon / truncation_length)`` truncations).
    task_factories: ``"package.module:factory"`` strings, each a function of no
      arguments returning a ``tasks.Task`` (``tasks.from_factory``); these tasks come
      after the suite's (or ``tasks``/``families``), and a resumed run rebuilds them.
    warm_start: classical optimizer whose muP version theta starts from
      (``LearnedOptimizer.from_classical(name, mup=True)``), or an artifact directory.
    hidden_size: width of the LO's per-parameter MLP (0: the warm start's).
    mup: meta-train a muP LO (hidden updates scaled by base_fan_in / fan_in); False
      gives the SP LO of the widths comparison (with a classical warm start).
    step_size_features, muon: turn these ``LOConfig`` switches on for the warm start
      (:meth:`metaopt.LearnedOptimizer.extended`: the weights they add start at zero,
      so the warm start's updates are unchanged); the exported artifact records them.
      False leaves the warm start as it is (an artifact with a switch on keeps it).
    estimator: ``"pes"`` (antithetic PES), ``"es"`` (truncated antithetic ES) or
      ``"tbptt"`` (truncated backprop).
    num_pairs: antithetic pairs per task that pass ``value=`` and ``num_steps=``
      (TBPTT: twice as many independent members).
    num_blind_pairs: pairs per task that pass neither (users who pass neither are then
      in distribution).
    sigma: std of the perturbation of (flattened) theta.
    truncation_length: K, inner steps per truncation.
    horizon: the episode length (the maximum one for ``log_uniform``).
    min_horizon: the shortest episode for ``log_uniform``.
    horizon_schedule: ``"constant"`` or ``"log_uniform"`` (rounded up to a multiple of K).
    meta_objective: ``"linear"``, the mean normalized loss, or ``"log"``, the mean of
      its log (see :mod:`metaopt.meta.unroll`): the linear one stops rewarding progress
      below a few percent of the initial loss.
    loss_bound: cap on the normalized loss (loss / the episode's initial loss); an
      inner run that goes NaN/inf contributes this value and is reset.
    augment_scale: a, reparametrize each tensor as ``w * 10^U(-a, a)`` per episode
      (0: off; at most :data:`MAX_AUGMENT_SCALE`; Celo's range is a = 3).
    outer_steps: meta-gradient steps.
    outer_learning_rate, outer_weight_decay, outer_clip_norm: the outer AdamW with
      global-norm clipping; its weight decay pulls theta toward the warm start.
    outer_decay_steps: cosine decay of the outer learning rate to 10% of its value over
      this many steps, constant after (0: constant throughout).
    tasks_per_step: tasks advanced per outer step (0: all of them, every step). With
      fewer, Adam's per-step normalization lets whichever task is drawn move theta a
      full step its way: a run on a few cheap tasks can push theta past what the others
      tolerate before they are drawn again.
    resample_every: outer steps between drawing the next tasks (``tasks_per_step > 0``).
    validation_task: suite task name evaluated every ``validation_every`` steps
      ("" : the first task).
    selection_suites: the ``tasks.get_suite`` names ``meta_train.py --score`` scores
      checkpoints on (release selection; not used while training).
    validation_every, validation_seeds: how often (0: never, not even for the summary)
      and on how many seeds.
    checkpoint_every, keep_checkpoints: orbax checkpoint period and retention.
    checkpoint_populations: save every population with theta (``--resume`` continues
      every episode where it stopped, bit-identically on CPU); False saves light
      checkpoints, theta, the outer optimizer state, key, step and config only (what
      travels off a leased machine), and ``--resume`` from one starts fresh staggered
      episodes (see docs/meta_training.md).
    log_every: outer steps between plain log lines (the JSONL log has every step).
    seed: the run's PRNG seed.
  """

  suite: str = "meta_train_default"
  task_names: tuple[str, ...] = ()
  tasks: tuple[str, ...] = ()
  families: tuple[str, ...] = ()
  family_samples: int = 4
  keep_suite: bool = False
  family_pool: int = 0
  family_window: int = 0
  task_factories: tuple[str, ...] = ()
  warm_start: str = "adamw"
  hidden_size: int = 0
  mup: bool = True
  step_size_features: bool = False
  muon: bool = False
  estimator: str = "pes"
  num_pairs: int = 4
  num_blind_pairs: int = 2
  sigma: float = 0.01
  truncation_length: int = 20
  horizon: int = 300
  min_horizon: int = 60
  horizon_schedule: str = "log_uniform"
  meta_objective: str = "linear"
  loss_bound: float = 3.0
  augment_scale: float = 0.0
  outer_steps: int = 1000
  outer_learning_rate: float = 3e-3
  outer_weight_decay: float = 0.0
  outer_clip_norm: float = 1.0
  outer_decay_steps: int = 0
  tasks_per_step: int = 0
  resample_every: int = 10
  validation_task: str = ""
  selection_suites: tuple[str, ...] = ("validation",)
  validation_every: int = 100
  validation_seeds: int = 4
  checkpoint_every: int = 50
  keep_checkpoints: int = 3
  checkpoint_populations: bool = True
  log_every: int = 10
  seed: int = 0

  def __post_init__(self):
    for name in ("task_names", "tasks", "families", "task_factories", "selection_suites"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    object.__setattr__(self, "tasks", tuple(
        t if isinstance(t, str) else json.dumps(t, sort_keys=True) for t in self.tasks))
    for spec in self.task_factories:
      if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"MetaConfig.task_factories has {spec!r}; expected "
                         "'package.module:factory' strings.")
    _check_choice("estimator", self.estimator, ESTIMATOR_NAMES)
    _check_choice("horizon_schedule", self.horizon_schedule, HORIZON_SCHEDULES)
    _check_choice("meta_objective", self.meta_objective, META_OBJECTIVES)
    for name in ("num_pairs", "truncation_length", "horizon", "min_horizon",
                 "outer_steps", "resample_every", "validation_seeds",
                 "checkpoint_every", "keep_checkpoints", "log_every", "family_samples"):
      _check_int(name, getattr(self, name), 1)
    for name in ("num_blind_pairs", "validation_every", "outer_decay_steps",
                 "tasks_per_step", "family_pool", "family_window"):
      _check_int(name, getattr(self, name), 0)
    _check_int("hidden_size", self.hidden_size, 0)
    for name in ("mup", "keep_suite", "step_size_features", "muon",
                 "checkpoint_populations"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"MetaConfig.{name}={getattr(self, name)!r}; expected true or "
                         "false.")
    if self.family_pool and self.family_samples > self.family_pool:
      raise ValueError(f"MetaConfig.family_samples={self.family_samples} > family_pool="
                       f"{self.family_pool}: a family cannot train more configs at once "
                       "than its pool holds.")
    if float(self.augment_scale) > MAX_AUGMENT_SCALE:
      raise ValueError(f"MetaConfig.augment_scale={self.augment_scale!r}; expected at most "
                       f"{MAX_AUGMENT_SCALE} (per-tensor scales 10^+-{MAX_AUGMENT_SCALE:g} "
                       "keep float32 gradients and their squares in range).")
    _check_int("seed", self.seed, 0)
    for name in ("sigma", "loss_bound", "outer_learning_rate", "outer_clip_norm"):
      if not float(getattr(self, name)) > 0:
        raise ValueError(f"MetaConfig.{name}={getattr(self, name)!r}; expected > 0.")
    for name in ("augment_scale", "outer_weight_decay"):
      if not float(getattr(self, name)) >= 0:
        raise ValueError(f"MetaConfig.{name}={getattr(self, name)!r}; expected >= 0.")
    if self.min_horizon > self.horizon:
      raise ValueError(f"MetaConfig.min_horizon={self.min_horizon} > horizon="
                       f"{self.horizon}.")
    if self.truncation_length > self.horizon:
      raise ValueError(f"MetaConfig.truncation_length={self.truncation_length} > "
                       f"horizon={self.horizon}.")

  @property
  def num_members(self) -> int:
    """Members per informed population (an antithetic pair counts as two)."""
    return 2 * self.num_pairs

  @property
  def num_blind_members(self) -> int:
    return 2 * self.num_blind_pairs

  @property
  def log_loss(self) -> bool:
    """Whether unrolls score the log meta-objective (training and validation alike)."""
    return self.meta_objective == "log"

  def replace(self, **changes) -> "MetaConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["task_names"] = list(self.task_names)
    d["families"] = list(self.families)
    d["task_factories"] = list(self.task_factories)
    d["selection_suites"] = list(self.selection_suites)
    d["tasks"] = [json.loads(t) for t in self.tasks]
    return d

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "MetaConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown MetaConfig fields {unknown}; expected a subset of "
                       f"{sorted(known)} (see docs/meta_training.md).")
    return cls(**d)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"MetaConfig.{name}={value!r}; expected one of {choices}.")


def _check_int(name: str, value: Any, low: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ValueError(f"MetaConfig.{name}={value!r}; expected an int >= {low}.")


# The default finishes in about 10 minutes on a 2-core CPU (compilation included); the
# transformer LM of the suite is left out (~20x slower per step than the other tasks).
# `smoke` is for a first try and CI: well under a minute.
_DEFAULT_STEPS = 500
# `user_shaped` is sized for a GPU (an H200: hours, not minutes): the muP suite plus
# the six user-shaped families, 8 configs each in the pool, 2 of each trained at a
# time, horizons 100-3000, per-tensor scales 10^U(-3, 3) (Celo's range).
USER_SHAPED_FAMILIES = ("sp_autoencoder", "sp_convnet", "sp_recurrent", "sp_regression",
                        "sp_resmlp", "sp_transformer_lm")
_USER_SHAPED_STEPS = 5000
PRESETS: dict[str, MetaConfig] = {
    "default": MetaConfig(
        task_names=("mlp_digits_w32_d2_relu_b64_mup", "mlp_digits_w128_d1_gelu_b128_mup",
                    "mlp_gmm_w64_d2_tanh_b64_mup", "mlp_teacher_w64_d2_silu_b64_mup",
                    "logistic_digits_b128_mup", "quadratic_d16_k100_n0.1",
                    "quadratic_d64_k1000_rot_n0.1"),
        num_pairs=6, num_blind_pairs=2, outer_learning_rate=3e-3, outer_weight_decay=0.3,
        outer_steps=_DEFAULT_STEPS, outer_decay_steps=_DEFAULT_STEPS,
        validation_task="mlp_digits_w32_d2_relu_b64_mup"),
    "smoke": MetaConfig(
        suite="smoke", task_names=("quadratic_d8_k10_rot_n0.1",), num_pairs=4,
        num_blind_pairs=2, truncation_length=10, horizon=50, min_horizon=20,
        outer_steps=30, outer_learning_rate=3e-2, validation_every=15,
        validation_seeds=2, checkpoint_every=10, log_every=5),
    "user_shaped": MetaConfig(
        suite="meta_train_default", keep_suite=True, families=USER_SHAPED_FAMILIES,
        family_pool=8, family_samples=2, augment_scale=3.0, num_pairs=8,
        num_blind_pairs=2, truncation_length=25, horizon=3000, min_horizon=100,
        meta_objective="log", outer_learning_rate=1e-3, outer_weight_decay=0.3,
        outer_steps=_USER_SHAPED_STEPS, outer_decay_steps=_USER_SHAPED_STEPS,
        validation_task="mlp_digits_w32_d2_relu_b64_mup",
        selection_suites=("validation", "validation-user"), validation_every=250,
        checkpoint_every=100, keep_checkpoints=20, log_every=10),
}


def parse_overrides(items: list[str]) -> dict[str, Any]:
  """``FIELD=VALUE`` command-line overrides (``--set``) as a dict. VALUE is read as JSON
  when it is JSON (``3``, ``true``, ``[1, 2]``), else kept as the string (a path)."""
  changes = {}
  for item in items:
    if "=" not in item:
      raise ValueError(f"expected FIELD=VALUE, got {item!r}")
    key, value = item.split("=", 1)
    try:
      changes[key] = json.loads(value)
    except json.JSONDecodeError:
      changes[key] = value
  return changes


# Config files of the repository (configs/NAME.json): ``--config NAME`` finds them too.
CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"


def config_files() -> list[str]:
  """Names of the repository's config files (``--config NAME`` reads NAME.json)."""
  return sorted(p.stem for p in CONFIG_DIR.glob("*.json")) if CONFIG_DIR.is_dir() else []


def load_config(name_or_file: str | pathlib.Path) -> MetaConfig:
  """A preset by name, a config file of the repository by name (``configs/NAME.json``:
  ``lease``, ``release_mup``, ...), or a JSON file of :class:`MetaConfig` fields."""
  if str(name_or_file) in PRESETS:
    return PRESETS[str(name_or_file)]
  path = pathlib.Path(name_or_file)
  if not path.is_file() and str(name_or_file) in config_files():
    path = CONFIG_DIR / f"{name_or_file}.json"
  if not path.is_file():
    raise ValueError(f"--config {name_or_file!r} is neither a preset "
                     f"{sorted(PRESETS)}, a config of {CONFIG_DIR} {config_files()} nor "
                     "a JSON file.")
  try:
    d = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e
  if not isinstance(d, dict):
    raise ValueError(f"{path}: expected a JSON object of MetaConfig fields.")
  return MetaConfig.from_dict(d)
