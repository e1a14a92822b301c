"""Benchmark harness: a learned optimizer against tuned and untuned baselines.

``evaluate.py`` is its command line. One concept per module: :mod:`baselines` (names ->
optimizer specs), :mod:`sweep` (learning-rate grids, schedules, choosing a setting),
:mod:`runner` (vmapped ``lax.scan`` training runs), :mod:`metrics` (definitions),
:mod:`cache` (per-run files for resuming), :mod:`plan` (which runs, in which order),
:mod:`harness` (running the plan over a suite), :mod:`summary` (aggregation),
:mod:`report` (Markdown, CSV, plots).
"""

from metaopt.eval.baselines import OptimizerSpec
from metaopt.eval.harness import EvalConfig
from metaopt.eval.harness import evaluate
from metaopt.eval.report import write_report

__all__ = [
    "EvalConfig",
    "OptimizerSpec",
    "evaluate",
    "write_report",
]
