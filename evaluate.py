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


# Flags that set an EvalConfig field: dest -> (field, parse). Unset flags keep the
# field's default (EvalConfig.for_suite: the suite's, else the dataclass's).
_CONFIG_FLAGS = {
    "baselines": ("tuned", _names),
    "untuned": ("untuned", _names),
    "seeds": ("seeds", int),
    "lr_grid_size": ("lr_grid_size", int),
    "lr_span": ("lr_span_decades", float),
    "lr_center": ("lr_center", float),
    "schedules": ("schedules", _names),
    "warmup_fraction": ("warmup_fraction", float),
    "tune_seeds": ("tune_seeds", int),
    "finalists": ("finalists", int),
    "lo_grid_size": ("lo_grid_size", int),
    "lo_span": ("lo_span_decades", float),
    "max_memory_gb": ("max_memory_gb", float),
    "tasks": ("task_filter", _names),
}


def _shown(value) -> str:
  """A default as --help shows it (tuples as the comma-separated flag value)."""
  return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def parser() -> argparse.ArgumentParser:
  from metaopt.eval import harness  # pylint: disable=g-import-not-at-top
  d = {f.name: _shown(f.default) for f in dataclasses.fields(harness.EvalConfig)
       if f.default is not dataclasses.MISSING}
  widths_tuned = _shown(harness.SUITE_DEFAULTS["widths"]["tuned"])
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="\n".join(__doc__.splitlines()[2:]))
  p.add_argument("--checkpoint", default="default",
                 help="LO artifact directory or released name (default: default)")
  p.add_argument("--suite", default=d["suite"], help="smoke, heldout, heldout-user, "
                 f"heldout-full, validation, widths (default {d['suite']})")
  p.add_argument("--out", default=None, help="output directory (default eval_out/SUITE)")
  p.add_argument("--baselines", "--tuned", dest="baselines", default=None,
                 help=f"comma-separated tuned baselines (default per suite; {d['suite']}: "
                 f"{d['tuned']}; widths: {widths_tuned}); add muon for "
                 "the Muon anchor (its Newton-Schulz matmuls make it the slowest on CPU: "
                 "see --estimate)")
  p.add_argument("--untuned", default=None,
                 help=f"comma-separated baselines at their defaults, or none (default: "
                 f"{d['untuned']})")
  p.add_argument("--seeds", type=int, default=None, help=f"default {d['seeds']}")
  p.add_argument("--lr-grid-size", type=int, default=None,
                 help=f"default {d['lr_grid_size']}")
  p.add_argument("--lr-span", type=float, default=None,
                 help=f"decades the lr grid spans (default {d['lr_span_decades']})")
  p.add_argument("--lr-center", type=float, default=None,
                 help="geometric centre of every tuned baseline's lr grid (default: "
                 "each one's own, e.g. adamw 10^-2.5, muon 10^-2)")
  p.add_argument("--schedules", default=None, help=f"default {d['schedules']}")
  p.add_argument("--warmup-fraction", type=float, default=None,
                 help=f"default {d['warmup_fraction']}")
  p.add_argument("--tune-seeds", type=int, default=None,
                 help=f"seeds every grid setting runs on (default {d['tune_seeds']}; "
                 ">= --seeds: all)")
  p.add_argument("--finalists", type=int, default=None,
                 help=f"best settings re-run on the remaining seeds (default "
                 f"{d['finalists']})")
  p.add_argument("--tune-lo", action="store_true",
                 help="also report the LO with its lr multiplier tuned around 1")
  p.add_argument("--lo-grid-size", type=int, default=None,
                 help=f"default {d['lo_grid_size']}")
  p.add_argument("--lo-span", type=float, default=None,
                 help=f"default {d['lo_span_decades']}")
  p.add_argument("--sp-checkpoint", default=None, help="an SP LO for the widths suite")
  p.add_argument("--widths", default=None, help="widths of the widths suite, e.g. 64,256")
  p.add_argument("--max-memory-gb", type=float, default=None,
                 help="skip tasks whose one run needs more (default: half the RAM)")
  p.add_argument("--tasks", default=None, help="only tasks whose name contains one of these")
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
  values = {field: parse(getattr(args, dest)) for dest, (field, parse) in
            _CONFIG_FLAGS.items() if getattr(args, dest) is not None}
  if args.widths:
    try:
      values["widths"] = tuple(int(w) for w in _names(args.widths))
    except ValueError:
      raise SystemExit(f"--widths {args.widths!r}: expected comma-separated positive ints, "
                       "e.g. 64,256,1024") from None
  if args.tune_lo:
    values["tune_lo"] = True
  if args.no_overlap:
    values["overlap_compile"] = False
  try:
    config = harness.EvalConfig.for_suite(args.suite, **values)
  except ValueError as e:
    flags = {"warmup_fraction": "--warmup-fraction", "lr_grid_size": "--lr-grid-size",
             "lo_grid_size": "--lo-grid-size", "lr_span_decades": "--lr-span",
             "lo_span_decades": "--lo-span", "widths": "--widths",
             "lr_center": "--lr-center"}
    flag = next((f for n, f in flags.items() if str(e).startswith(f"{n}=")), None)
    raise SystemExit(f"{flag}: {e}" if flag else str(e)) from None
  for name in (*config.tuned, *(n for n in config.untuned if n not in baselines.ANCHORS)):
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
  plan = harness.plan(config, specs)
  print(f"suite {config.suite}: {len({j.task for j in plan.jobs})} tasks, {len(specs)} optimizers, "
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
