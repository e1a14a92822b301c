"""The evaluation plan: which (task, optimizer) jobs run, in which order, and their runs.

Worked out from the :class:`~metaopt.eval.harness.EvalConfig` and the optimizer specs
alone, before any task is built or run: :class:`~metaopt.eval.harness.Evaluation` runs
it, :func:`~metaopt.eval.harness.estimate_seconds` prices it, and
:func:`~metaopt.eval.harness.default_eval_runs` counts the default one's runs.

Tuning protocol (the module docstring of :mod:`metaopt.eval.harness`): a spec with one
setting runs on every seed; one with several settings (schedule x learning rate) runs
them all on the tuning seeds, then its ``finalists`` best on the remaining seeds, unless
``tune_seeds >= seeds`` (the full grid on every seed).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import tasks as tasks_lib
from metaopt.eval import baselines
from metaopt.eval import runner

if TYPE_CHECKING:
  from metaopt.eval.harness import EvalConfig

# Seconds of (estimated) extra training worth spending to reuse a compilation.
PAD_BUDGET_S = 2.0


@dataclasses.dataclass(frozen=True)
class Job:
  """One optimizer on one task; ``task`` names the report row it belongs to."""

  task: str
  entry: Any  # tasks.SuiteEntry
  spec: baselines.OptimizerSpec
  width: int | None = None


@dataclasses.dataclass(frozen=True)
class OptimizerPlan:
  """The runs of one optimizer on one task under the tuning protocol.

  Attributes:
    first_points: every setting on every seed, or on the tuning seeds when it is tuned
      in two stages (schedule-major, then learning rate, then seed).
    finalists: settings re-run on ``confirm_seeds`` (0: one stage).
    confirm_seeds: the seeds the finalists run on.
  """

  first_points: tuple[runner.RunPoint, ...]
  finalists: int = 0
  confirm_seeds: tuple[int, ...] = ()

  @property
  def two_stage(self) -> bool:
    return self.finalists > 0

  @property
  def first_stage(self) -> str:
    """The stage recorded for the first points: ``"sweep"`` or ``"run"``."""
    return "sweep" if self.two_stage else "run"

  @property
  def confirm_runs(self) -> int:
    return self.finalists * len(self.confirm_seeds)

  @property
  def runs(self) -> int:
    return len(self.first_points) + self.confirm_runs

  def pad_to(self, missing: int, run_cost_s: float) -> int | None:
    """For a cheap task, the first stage's batch size to pad ``missing`` runs to.

    Re-running that compiled shape (in this process, or from JAX's persistent cache)
    beats compiling a smaller one when the padded runs cost under PAD_BUDGET_S
    (``run_cost_s`` each): a resumed job, and the confirmation stage of a cheap task.
    """
    full = len(self.first_points)
    extra_s = (full - missing) * run_cost_s
    return full if 0 < missing < full and extra_s < PAD_BUDGET_S else None


@dataclasses.dataclass(frozen=True)
class EvalPlan:
  """Every job of an evaluation in run order (task by task) and each optimizer's runs."""

  jobs: tuple[Job, ...]
  optimizers: Mapping[str, OptimizerPlan]  # by spec label

  def runs(self, job: Job) -> int:
    return self.optimizers[job.spec.label].runs

  @property
  def total_runs(self) -> int:
    return sum(self.runs(j) for j in self.jobs)

  @property
  def runs_per_task(self) -> int:
    """Runs of every optimizer on one task (each runs on every task)."""
    return sum(p.runs for p in self.optimizers.values())


def optimizer_plan(config: EvalConfig, spec: baselines.OptimizerSpec) -> OptimizerPlan:
  """The runs of ``spec`` on each task of ``config``'s evaluation."""
  settings = len(spec.lrs) * len(spec.schedules)
  two_stage = settings > 1 and config.tune_seeds < config.seeds
  seeds = range(config.tune_seeds if two_stage else config.seeds)
  first = tuple(runner.RunPoint(s, lr, seed) for s in spec.schedules for lr in spec.lrs
                for seed in seeds)
  if not two_stage:
    return OptimizerPlan(first)
  return OptimizerPlan(first, min(config.finalists, settings),
                       tuple(range(config.tune_seeds, config.seeds)))


def jobs(config: EvalConfig, optimizer_specs: Sequence[baselines.OptimizerSpec]
         ) -> list[Job]:
  """Every (task, optimizer) pair of the suite, task by task.

  In the ``widths`` suite, muP optimizers (:attr:`OptimizerSpec.mup`) run on the muP
  networks and the others on their SP twins.
  """
  if config.suite == "widths":
    widths = config.widths or tasks_lib.suites.DEFAULT_WIDTHS
    mup_entries = tasks_lib.widths_suite(widths, mup=True)
    sp_entries = tasks_lib.widths_suite(widths, mup=False)
    out = [Job(f"width {w}", (m if s.mup else p), s, w)
           for w, m, p in zip(widths, mup_entries, sp_entries) for s in optimizer_specs]
  else:
    out = [Job(e.name, e, s) for e in tasks_lib.get_suite(config.suite)
           for s in optimizer_specs]
  if config.task_filter:
    out = [j for j in out if any(f in j.entry.name for f in config.task_filter)]
  return out


def plan(config: EvalConfig, optimizer_specs: Sequence[baselines.OptimizerSpec]
         ) -> EvalPlan:
  """The evaluation ``config`` describes for ``optimizer_specs`` (nothing is built)."""
  return EvalPlan(tuple(jobs(config, optimizer_specs)),
                  {s.label: optimizer_plan(config, s) for s in optimizer_specs})
