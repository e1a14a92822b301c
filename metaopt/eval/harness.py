"""The evaluation: the runs a suite needs, run when not cached, as per-run records.

Tuning protocol for a baseline with several settings (schedule x learning rate): every
setting runs on the first ``tune_seeds`` seeds; the ``finalists`` best of them run on the
remaining seeds; the reported setting is the best finalist over all seeds
(:func:`metaopt.eval.summary.chosen_settings`). ``tune_seeds >= seeds`` runs the full
grid on every seed. Optimizers with one setting run on every seed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Sequence

import jax
import numpy as np

import tasks as tasks_lib
import metaopt
from metaopt import mup
from metaopt import optimizers
from metaopt.eval import baselines
from metaopt.eval import cache as cache_lib
from metaopt.eval import metrics
from metaopt.eval import plan as plan_lib
from metaopt.eval import progress as progress_lib
from metaopt.eval import runner
from metaopt.eval import summary
from metaopt.eval import sweep
from metaopt.eval.plan import Job
from metaopt.eval.plan import jobs
from metaopt.eval.plan import plan

# Bytes of device memory per parameter of one run: params, grads, <= 8 optimizer
# buffers, temporaries.
BYTES_PER_PARAM = 4 * 16
# A learned-optimizer step costs about this many AdamW steps (CPU time, heldout MLPs).
LEARNED_COST_FACTOR = 5.0


# Per-suite defaults of EvalConfig fields (see EvalConfig.for_suite).
SUITE_DEFAULTS = {
    # heldout, heldout-full: 3 tuned + 5 untuned baselines, two-stage tuning (the
    # default heldout evaluation is sized for about 20 minutes on a 2-core CPU).
    # smoke (under a minute): one tuned and one untuned baseline, full grid on all seeds.
    "smoke": {"tuned": ("adamw",), "untuned": ("prodigy",), "tune_seeds": 3},
    # widths: the muP LO and mu_adamw on muP networks, AdamW and an SP LO on SP ones.
    "widths": {"tuned": ("adamw", "mu_adamw"), "untuned": ()},
}


def _default_memory_gb() -> float:
  """Half of the machine's physical memory."""
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 31
  except (ValueError, OSError, AttributeError):
    return 8.0


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """What an evaluation runs (everything but the learned optimizers themselves).

  Attributes:
    suite: a :func:`tasks.get_suite` name.
    seeds: seeds per reported setting.
    tuned: baselines tuned over ``schedules x`` a log grid of learning rates.
    untuned: baselines run at their defaults.
    lr_grid_size, lr_span_decades: the learning-rate grid (values, decades spanned).
    lr_center: the grid's geometric centre for every tuned baseline (None: each one's
      :data:`metaopt.eval.baselines.LR_CENTERS` entry).
    schedules: schedule names crossed with the grid.
    warmup_fraction: warmup length of ``warmup_cosine`` as a fraction of the steps.
    tune_seeds: seeds every grid setting runs on (see the module docstring).
    finalists: settings re-run on the remaining seeds.
    tune_lo: also report the LO with its learning-rate multiplier tuned.
    lo_grid_size, lo_span_decades: the multiplier grid around 1.0.
    widths: widths of the ``widths`` suite (None: the suite's default).
    max_memory_gb: skip tasks whose single run needs more; batches are split to fit
      (default: half the physical memory).
    task_filter: run only tasks whose name contains one of these strings.
    overlap_compile: compile the next job on a background thread while one runs
      (faster; the measured time per step then includes that contention).
  """

  suite: str = "heldout"
  seeds: int = 3
  tuned: tuple[str, ...] = baselines.DEFAULT_TUNED
  untuned: tuple[str, ...] = baselines.DEFAULT_UNTUNED
  lr_grid_size: int = 7
  lr_span_decades: float = 3.0
  lr_center: float | None = None
  schedules: tuple[str, ...] = sweep.SCHEDULE_NAMES
  warmup_fraction: float = 0.05
  tune_seeds: int = 1
  finalists: int = 3
  tune_lo: bool = False
  lo_grid_size: int = 5
  lo_span_decades: float = 2.0
  widths: tuple[int, ...] | None = None
  max_memory_gb: float = dataclasses.field(default_factory=_default_memory_gb)
  task_filter: tuple[str, ...] = ()
  overlap_compile: bool = True

  def __post_init__(self):
    if self.seeds < 1 or self.tune_seeds < 1 or self.finalists < 1:
      raise ValueError(f"seeds={self.seeds}, tune_seeds={self.tune_seeds} and "
                       f"finalists={self.finalists} must be >= 1.")
    for name in ("lr_grid_size", "lo_grid_size"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}; expected an int >= 1.")
    if not 0.0 <= self.warmup_fraction < 1.0:
      raise ValueError(f"warmup_fraction={self.warmup_fraction!r}; expected a value in "
                       "[0, 1).")
    if self.lr_center is not None and not 0 < self.lr_center < float("inf"):
      raise ValueError(f"lr_center={self.lr_center!r}; expected a value in (0, inf).")
    for name in ("lr_span_decades", "lo_span_decades"):
      value = getattr(self, name)
      if not 0.0 <= value < float("inf"):
        raise ValueError(f"{name}={value!r}; expected a value in [0, inf).")
    if not 0.0 < self.max_memory_gb < float("inf"):
      raise ValueError(f"max_memory_gb={self.max_memory_gb!r}; expected a finite number "
                       "> 0.")
    if self.widths is not None and not all(
        isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in self.widths):
      raise ValueError(f"widths={self.widths!r}; expected positive ints.")
    for s in self.schedules:
      sweep.schedule_shape(s, 2)

  @classmethod
  def for_suite(cls, suite: str, **overrides) -> "EvalConfig":
    """The config of ``suite`` with its :data:`SUITE_DEFAULTS`, then ``overrides``."""
    return cls(suite=suite, **{**SUITE_DEFAULTS.get(suite, {}), **overrides})


@dataclasses.dataclass
class Outcome:
  """Records of every run, runs computed now (the rest came from the cache), skips."""

  records: list[dict]
  computed: int
  skipped: list[str]


def specs(config: EvalConfig, lo: Any, sp_lo: Any = None) -> list[baselines.OptimizerSpec]:
  """The learned optimizer(s) and every baseline of ``config``."""
  out = [baselines.learned(lo)]
  if config.tune_lo:
    out.append(baselines.learned(lo, label="lo (lr-tuned)", lrs=sweep.lr_grid(
        1.0, config.lo_grid_size, config.lo_span_decades)))
  if sp_lo is not None:
    out.append(baselines.learned(sp_lo, label="lo-sp", mup=False))
  out += [baselines.tuned(n, grid_size=config.lr_grid_size,
                          span_decades=config.lr_span_decades, schedules=config.schedules,
                          center=config.lr_center)
          for n in config.tuned]
  out += [baselines.untuned(n) for n in config.untuned]
  labels = [s.label for s in out]
  repeated = sorted({l for l in labels if labels.count(l) > 1})
  if repeated:
    raise ValueError(f"optimizers listed twice: {repeated}.")
  return out


def fits(config: EvalConfig, task: Any) -> bool:
  """Whether one run of ``task`` fits in ``config.max_memory_gb``."""
  return BYTES_PER_PARAM * task.num_params() <= config.max_memory_gb * 2 ** 30


def run_record(job: Job, task: Any, output: runner.RunOutput, stage: str) -> dict:
  """The per-run record stored in the cache and written to the CSV (curve aside)."""
  losses = output.losses
  steps, curve = metrics.binned_curve(losses)
  p = output.point
  return {
      "task": job.task, "task_config": task.name, "width": job.width,
      "optimizer": job.spec.label, "kind": job.spec.kind, "source": job.spec.source,
      "schedule": p.schedule, "lr": p.lr, "seed": p.seed, "stage": stage,
      "num_steps": task.num_steps, "initial_loss": float(losses[0]),
      "final_loss": metrics.final_loss(losses), "diverged": metrics.diverged(losses),
      "test_loss": output.test.get("loss", math.nan),
      "test_accuracy": output.test.get("accuracy", math.nan),
      "ms_per_step": output.seconds_per_step * 1e3,
      "curve_steps": steps.tolist(), "curve": curve.tolist(),
  }


class Evaluation:
  """Runs jobs through a :class:`~metaopt.eval.cache.RunCache`, compiling ahead.

  Each job follows its optimizer's :class:`~metaopt.eval.plan.OptimizerPlan`.
  """

  def __init__(self, config: EvalConfig, cache: cache_lib.RunCache,
               progress: progress_lib.Progress | None = None,
               compiler: runner.Compiler | None = None):
    self.config, self.cache = config, cache
    self.progress = progress or progress_lib.Progress(0, enabled=False)
    self.compiler = compiler or runner.Compiler(background=False)
    self.computed = 0

  def max_batch(self, task: Any) -> int:
    per_run = BYTES_PER_PARAM * task.num_params()
    return max(1, int(self.config.max_memory_gb * 2 ** 30 // per_run))

  def _paths(self, job: Job, task: Any, points: Sequence[runner.RunPoint]) -> list:
    task_id = (task.name, tasks_lib.config_to_json(task.config) + f"|{task.num_steps}")
    opt_id = (job.spec.label, f"{job.spec.fingerprint}|warmup={self.config.warmup_fraction}")
    return [self.cache.path(task_id, opt_id, p.schedule, p.lr, p.seed) for p in points]

  def prefetch(self, job: Job, task: Any) -> None:
    """Starts compiling the batches ``job`` will run (those not cached)."""
    p = plan_lib.optimizer_plan(self.config, job.spec)
    missing = sum(not path.is_file() for path in self._paths(job, task, p.first_points))
    cost_s = _run_cost_s(job)
    for n in (p.pad_to(missing, cost_s) or missing,
              p.pad_to(p.confirm_runs, cost_s) or p.confirm_runs):
      for size in runner.batch_sizes(n, self.max_batch(task)):
        self.compiler.prefetch(task, job.spec, job.spec.schedules, size,
                               self.config.warmup_fraction)

  def _complete(self, job: Job, task: Any, p: plan_lib.OptimizerPlan,
                points: Sequence[runner.RunPoint], stage: str) -> list[dict]:
    """Records of ``points``: cached ones loaded, the others run and cached."""
    paths = self._paths(job, task, points)
    records = [self.cache.load(path) for path in paths]
    missing = [i for i, r in enumerate(records) if r is None]
    if len(missing) < len(points):
      self.progress.update(len(points) - len(missing), f"{job.task} {job.spec.label}: cached")
    if missing:
      outputs, compile_s = runner.run_points(
          task, job.spec, [points[i] for i in missing], schedules=job.spec.schedules,
          warmup_fraction=self.config.warmup_fraction, max_batch=self.max_batch(task),
          compiler=self.compiler, pad_to=p.pad_to(len(missing), _run_cost_s(job)))
      for i, out in zip(missing, outputs):
        records[i] = run_record(job, task, out, stage)
        records[i]["compile_s"] = compile_s / len(missing)
        self.cache.save(paths[i], records[i])
      self.computed += len(missing)
      self.progress.update(len(missing), f"{job.task} {job.spec.label} ({stage})")
    return records

  def run_job(self, job: Job, task: Any) -> list[dict]:
    """Every record of one (task, optimizer) job, following the tuning protocol."""
    p = plan_lib.optimizer_plan(self.config, job.spec)
    first = self._complete(job, task, p, p.first_points, p.first_stage)
    if not p.two_stage:
      return first
    stats = summary.setting_stats(first)
    ranked = sweep.ranked_settings((st, st.diverged_fraction, st.final_mean)
                                   for st in stats)[:p.finalists]
    confirm = self._complete(
        job, task, p, [runner.RunPoint(st.schedule, st.lr, seed) for st in ranked
                       for seed in p.confirm_seeds], "confirm")
    return first + confirm


def _run_cost_s(job: Job) -> float:
  """Estimated seconds of one run of ``job`` (inf for a job without a suite entry)."""
  return getattr(job.entry, "est_cost_s", math.inf)


def evaluate(config: EvalConfig, optimizer_specs: Sequence[baselines.OptimizerSpec],
             cache_dir: str | os.PathLike, *, show_progress: bool = True) -> Outcome:
  """Runs (or loads) every run of the suite; returns all records."""
  the_plan = plan(config, optimizer_specs)
  built = {}  # entry name -> task, or None when it does not fit in memory
  skipped = []
  for job in the_plan.jobs:
    if job.entry.name not in built:
      task = job.entry.build()
      built[job.entry.name] = task if fits(config, task) else None
      if built[job.entry.name] is None:
        skipped.append(f"{job.entry.name}: one run needs more than --max-memory-gb "
                       f"{config.max_memory_gb:g}")
  the_plan = dataclasses.replace(
      the_plan, jobs=tuple(j for j in the_plan.jobs if built[j.entry.name] is not None))
  evaluation = Evaluation(
      config, cache_lib.RunCache(cache_dir),
      progress=progress_lib.Progress(the_plan.total_runs, enabled=show_progress),
      compiler=runner.Compiler(background=config.overlap_compile))
  all_jobs = the_plan.jobs
  records = []
  try:
    for i, job in enumerate(all_jobs):
      for ahead in all_jobs[i:i + 2]:
        evaluation.prefetch(ahead, built[ahead.entry.name])
      records += evaluation.run_job(job, built[job.entry.name])
  finally:
    evaluation.progress.close()
    evaluation.compiler.close()
  return Outcome(records, evaluation.computed, skipped)


MUON_SOURCES = ("metaopt.optimizers.muon", "optax.contrib.muon")


def newton_schulz_seconds_per_step(task: Any, spec: baselines.OptimizerSpec,
                                   ns_steps: int = 5) -> float:
  """Seconds per step that Muon's Newton-Schulz iterations add to an AdamW step.

  Each orthogonalized ``[r, c]`` view (``r <= c``) costs ``ns_steps * (2 r^2 c + r^3)``
  multiply-adds (``X X^T``, ``A A``, ``(b A + c A^2) X``), priced at the tasks' cost
  model's :data:`tasks.cost.S_PER_MAC`. The matmuls are what make Muon expensive on a
  CPU: a 512 x 512 hidden layer adds ~0.1 s per step at batch 32 (measured: 95 vs
  2.6 ms for AdamW). 0 for optimizers other than Muon.
  """
  if spec.source not in MUON_SOURCES:
    return 0.0
  shapes = jax.eval_shape(task.init, jax.random.key(0))
  if spec.source == "metaopt.optimizers.muon":
    labels = optimizers.muon_labels(shapes, roles=task.roles)
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    views = []
    for (path, leaf), label in zip(flat, jax.tree.leaves(labels)):
      if label == "muon":
        fan_in = mup.default_fan_in(leaf.shape, jax.tree_util.keystr(path))
        views.append((fan_in, math.prod(leaf.shape) // fan_in))
  else:  # optax's default: every 2-D leaf
    views = [leaf.shape for leaf in jax.tree.leaves(shapes) if leaf.ndim == 2]
  macs = sum(ns_steps * (2 * min(v) ** 2 * max(v) + min(v) ** 3) for v in views)
  return macs * tasks_lib.cost.S_PER_MAC


@functools.cache
def default_eval_runs() -> int:
  """Runs per task of the default evaluation (``EvalConfig()``) of the released learned
  optimizer, as :func:`metaopt.eval.plan.plan` works them out."""
  config = EvalConfig()
  return plan(config, specs(config, metaopt.pretrained())).runs_per_task


def estimate_eval_seconds(entries: Sequence[tasks_lib.SuiteEntry], runs: int | None = None
                          ) -> float:
  """Estimated seconds to train every suite entry ``runs`` times (default: the default
  evaluation's, :func:`default_eval_runs`; single-seed AdamW cost)."""
  return (default_eval_runs() if runs is None else runs) * sum(e.est_cost_s for e in entries)


def estimate_seconds(config: EvalConfig, optimizer_specs: Sequence[baselines.OptimizerSpec]
                     ) -> float:
  """Rough wall time of the runs from the tasks' cost model (compilation excluded).

  Muon's Newton-Schulz cost is added per task (:func:`newton_schulz_seconds_per_step`;
  it builds the tasks Muon runs on, a few seconds).
  """
  the_plan = plan(config, optimizer_specs)
  total = 0.0
  built = {}
  for j in the_plan.jobs:
    factor = LEARNED_COST_FACTOR if j.spec.kind == "learned" else 1.0
    total += factor * the_plan.runs(j) * j.entry.est_cost_s
    if j.spec.source in MUON_SOURCES:
      if j.entry.name not in built:
        built[j.entry.name] = j.entry.build()
      total += the_plan.runs(j) * j.entry.num_steps * newton_schulz_seconds_per_step(
          built[j.entry.name], j.spec)
  return float(np.round(total, 1))
