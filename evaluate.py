"""Evaluate a learned optimizer against tuned classical optimizers on a task suite.

Usage::

  python evaluate.py                                  # released LO on `heldout`
  python evaluate.py --checkpoint runs/mine/final --suite smoke --out eval_out/smoke
  python evaluate.py --suite widths --sp-checkpoint runs/sp/final --widths 64,256,1024
  python evaluate.py --baselines adamw,lion --untuned prodigy --tune-lo
  python evaluate.py --tuned adamw,muon               # tuned AdamW and Muon anchors
  python evaluate.py --estimate                       # print the plan, run nothing

Writes OUT/report.md, OUT/runs.csv (one row per run) and OUT/plots/*.png. Finished runs
are cached under OUT/cache/, so re-running the same command resumes an interrupted
evaluation and recomputes only the missing runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import pathlib
import sys
import time

def _names(value: str) -> tuple[str, ...]:
  return tuple(v.strip() for v in value.split(",") if v.strip() and v.strip() != "none")


def _load_lo(name_or_path: str, flag: str):
  """A learned optimizer from an artifact directory or a released name."""
  import metaopt  # pylint: disable=g-import-not-at-top
  if os.path.sep in name_or_path or pathlib.Path(name_or_path).exists():
    try:
      return metaopt.load(name_or_path)
    except metaopt.checkpoint.ArtifactError as e:
      raise SystemExit(f"{flag} {name_or_path}: {e}") from None
  try:
    return metaopt.pretrained(name_or_path)
  except ValueError as e:
    raise SystemExit(
        f"{flag} {name_or_path!r}: {e}\nPass the path of an artifact instead, e.g. "
        "`python meta_train.py --out runs/mine` then `--checkpoint runs/mine/final` "
        "(a directory written by metaopt.checkpoint.save).") from None


def _enable_compilation_cache(path: pathlib.Path) -> None:
  """JAX's persistent compilation cache, so a resumed evaluation skips recompiling."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="\n".join(__doc__.splitlines()[2:]))
  p.add_argument("--checkpoint", default="default",
                 help="LO artifact directory or released name (default: default)")
  p.add_argument("--suite", default="heldout", help="smoke, heldout, heldout-user, heldout-full, validation, widths")
  p.add_argument("--out", default=None, help="output directory (default eval_out/SUITE)")
  p.add_argument("--baselines", "--tuned", dest="baselines", default=None,
                 help="comma-separated tuned baselines (default per suite; heldout: "
                 "adamw,lion,schedule_free_adamw; widths: adamw,mu_adamw); add muon for "
                 "the Muon anchor (its Newton-Schulz matmuls make it the slowest on CPU: "
                 "see --estimate)")
  p.add_argument("--untuned", default=None,
                 help="comma-separated baselines at their defaults, or none (default: "
                 "adamw,prodigy,dadapt_adamw,momo_adam,schedule_free_adamw)")
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--lr-grid-size", type=int, default=7)
  p.add_argument("--lr-span", type=float, default=3.0, help="decades the lr grid spans")
  p.add_argument("--schedules", default="constant,warmup_cosine")
  p.add_argument("--warmup-fraction", type=float, default=0.05)
  p.add_argument("--tune-seeds", type=int, default=None,
                 help="seeds every grid setting runs on (default 1; >= --seeds: all)")
  p.add_argument("--finalists", type=int, default=3,
                 help="best settings re-run on the remaining seeds")
  p.add_argument("--tune-lo", action="store_true",
                 help="also report the LO with its lr multiplier tuned around 1")
  p.add_argument("--lo-grid-size", type=int, default=5)
  p.add_argument("--lo-span", type=float, default=2.0)
  p.add_argument("--sp-checkpoint", default=None, help="an SP LO for the widths suite")
  p.add_argument("--widths", default=None, help="widths of the widths suite, e.g. 64,256")
  p.add_argument("--max-memory-gb", type=float, default=None,
                 help="skip tasks whose one run needs more (default: half the RAM)")
  p.add_argument("--tasks", default="", help="only tasks whose name contains one of these")
  p.add_argument("--estimate", action="store_true", help="print the plan and exit")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--no-overlap", action="store_true",
                 help="do not compile the next job while one runs (cleaner timings)")
  return p


def config_from_args(args: argparse.Namespace):
  """The :class:`metaopt.eval.EvalConfig` the flags describe (names validated)."""
  import tasks  # pylint: disable=g-import-not-at-top
  from metaopt.eval import baselines, harness  # pylint: disable=g-import-not-at-top
  try:
    tasks.get_suite(args.suite)
  except ValueError as e:
    raise SystemExit(f"--suite: {e}") from None
  values = {}
  if args.baselines is not None:
    values["tuned"] = _names(args.baselines)
  if args.untuned is not None:
    values["untuned"] = _names(args.untuned)
  if args.tune_seeds is not None:
    values["tune_seeds"] = args.tune_seeds
  if args.max_memory_gb is not None:
    values["max_memory_gb"] = args.max_memory_gb
  widths = None
  if args.widths:
    try:
      widths = tuple(int(w) for w in _names(args.widths))
    except ValueError:
      raise SystemExit(f"--widths {args.widths!r}: expected comma-separated positive ints, "
                       "e.g. 64,256,1024") from None
  try:
    config = harness.EvalConfig.for_suite(
        args.suite, seeds=args.seeds, lr_grid_size=args.lr_grid_size,
        lr_span_decades=args.lr_span, schedules=_names(args.schedules),
        warmup_fraction=args.warmup_fraction, finalists=args.finalists,
        tune_lo=args.tune_lo, lo_grid_size=args.lo_grid_size,
        lo_span_decades=args.lo_span,
        widths=widths,
        task_filter=_names(args.tasks), overlap_compile=not args.no_overlap, **values)
  except ValueError as e:
    flags = {"warmup_fraction": "--warmup-fraction", "lr_grid_size": "--lr-grid-size",
             "lo_grid_size": "--lo-grid-size", "lr_span_decades": "--lr-span",
             "lo_span_decades": "--lo-span", "widths": "--widths"}
    flag = next((f for n, f in flags.items() if str(e).startswith(f"{n}=")), None)
    raise SystemExit(f"{flag}: {e}" if flag else str(e)) from None
  for name in (*config.tuned, *config.untuned):
    try:
      baselines.resolve(name)
    except ValueError as e:
      raise SystemExit(f"--baselines/--untuned: {e}") from None
  return config


def _check_task_filter(config, specs) -> None:
  """Every ``--tasks`` string must match a task of the suite (a typo is not 0 tasks)."""
  from metaopt.eval import harness  # pylint: disable=g-import-not-at-top
  if not config.task_filter:
    return
  names = sorted({j.entry.name for j in harness.jobs(
      dataclasses.replace(config, task_filter=()), specs)})
  unmatched = [f for f in config.task_filter if not any(f in n for n in names)]
  if unmatched:
    raise SystemExit(f"--tasks: {', '.join(map(repr, unmatched))} matches no task of the "
                     f"{config.suite} suite; its tasks are {', '.join(names)}")


def main(argv: list[str] | None = None, *, persistent_cache: bool = False) -> int:
  """Runs the evaluation; ``persistent_cache`` keeps compilations in OUT/xla_cache (set
  it only in a fresh process: JAX reads the setting at its first compilation).

  Bad input ends in one line on stderr naming the value and what was expected, and
  the return value 2 (argparse's own errors exit 2 as well)."""
  try:
    return _main(argv, persistent_cache)
  except SystemExit as e:
    if not isinstance(e.code, str):
      raise
    print(f"evaluate.py: {e.code}", file=sys.stderr)
    return 2


def _main(argv: list[str] | None, persistent_cache: bool) -> int:
  args = parser().parse_args(argv)
  config = config_from_args(args)
  from metaopt.eval import harness, report  # pylint: disable=g-import-not-at-top
  lo = _load_lo(args.checkpoint, "--checkpoint")
  sp_lo = _load_lo(args.sp_checkpoint, "--sp-checkpoint") if args.sp_checkpoint else None
  try:
    specs = harness.specs(config, lo, sp_lo)
  except ValueError as e:
    raise SystemExit(f"--baselines/--untuned: {e}") from None
  _check_task_filter(config, specs)
  estimate = harness.estimate_seconds(config, specs)
  plan = harness.jobs(config, specs)
  print(f"suite {config.suite}: {len({j.task for j in plan})} tasks, {len(specs)} optimizers, "
        f"~{estimate / 60:.1f} min of training by the tasks' cost model (+ compilation)",
        file=sys.stderr)
  if args.estimate:
    return 0
  out = pathlib.Path(args.out or pathlib.Path("eval_out") / config.suite)
  if persistent_cache:
    _enable_compilation_cache(out / "xla_cache")
  start = time.perf_counter()
  result = harness.evaluate(config, specs, out / "cache", show_progress=not args.no_progress)
  elapsed = time.perf_counter() - start
  header = {
      "suite": config.suite,
      "checkpoint": lo.metadata.get("path", args.checkpoint),
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "runs": f"{len(result.records)} ({result.computed} computed now, "
              f"{len(result.records) - result.computed} from the cache)",
      "wall time": f"{elapsed:.0f} s",
      "protocol": (f"{config.seeds} seeds; lr grid of {config.lr_grid_size} values over "
                   f"{config.lr_span_decades:g} decades x schedules "
                   f"{', '.join(config.schedules)}; grid on {min(config.tune_seeds, config.seeds)} "
                   f"seed(s), {config.finalists} finalists on all seeds"),
      "config": {k: v for k, v in dataclasses.asdict(config).items()},
  }
  paths = report.write_report(out, result.records, header=header, skipped=result.skipped)
  print(f"wrote {paths['report']}, {paths['csv']} and {len(paths['plots'])} plots "
        f"in {elapsed:.0f} s", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main(persistent_cache=True))
