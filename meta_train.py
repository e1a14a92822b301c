"""Meta-train the learned optimizer (PES by default) on a task suite.

Usage::

  python meta_train.py                      # preset "default" (~10 min on a 2-core CPU)
  python meta_train.py --config smoke       # < 1 min
  python meta_train.py --config user_shaped --out runs/user_shaped   # GPU-sized
  python meta_train.py --config my.json --out runs/mine --plot
  python meta_train.py --resume             # continue the newest run under runs/
  python meta_train.py --plot-run runs/mine # only draw its meta-loss curves
  python meta_train.py --set outer_steps=2000 --set sigma=0.02
  python meta_train.py --config smoke --task mypkg.tasks:make_task  # + your own task

Multi-host (every host runs the same command)::

  python meta_train.py --coordinator host0:1234 --num-processes 4 --process-id $I

(or ``$METAOPT_COORDINATOR``, ``$METAOPT_NUM_PROCESSES``, ``$METAOPT_PROCESS_ID``; on a
TPU pod ``--num-processes -1`` lets JAX detect the cluster). The config format is
documented in docs/meta_training.md.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import sys
import threading
import time


class _UsageError(Exception):
  """A mistake on the command line: its message is one line on stderr, exit status 2."""


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    if args.plot_run:
      from metaopt.meta import logging as log_lib  # pylint: disable=g-import-not-at-top
      print(log_lib.plot_metrics(args.plot_run))
      return 0
    if args.score is not None:
      return _score(args.out, args.score)
    if args.export is not None:
      return _export(args.out, args.export, args.export_to)
    from metaopt.meta import sharding  # pylint: disable=g-import-not-at-top
    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    config, out = _config_and_out(args)
    _compile_cache(args.compile_cache, out)
    return _train(config, out, args)
  except _UsageError as e:
    print(e, file=sys.stderr)
    return 2


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(__doc__.splitlines()[2:]))
  parser.add_argument("--config", default=None,
                      help="preset name (default, smoke, user_shaped) or a JSON file of MetaConfig")
  parser.add_argument("--out", default=None,
                      help="run directory (default runs/<timestamp>); with --resume, a "
                      "run directory or a folder of runs (default runs/)")
  parser.add_argument("--resume", action="store_true",
                      help="continue the newest checkpointed run under --out")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="override a config field (JSON value)")
  parser.add_argument("--task", action="append", default=[], metavar="MODULE:FACTORY",
                      help="also meta-train on FACTORY() of MODULE (imported; the working "
                      "directory is on the path), a tasks.Task; repeatable; recorded in "
                      "config.json so --resume rebuilds it")
  parser.add_argument("--plot", action="store_true", help="draw meta_loss.png at the end")
  parser.add_argument("--plot-run", default=None, metavar="RUN",
                      help="only draw RUN/meta_loss.png from its metrics.jsonl")
  parser.add_argument("--export", type=int, default=None, metavar="STEP",
                      help="only write checkpoint STEP of the run --out as an LO artifact "
                      "in --export-to (default RUN/step_STEP)")
  parser.add_argument("--export-to", default=None, metavar="DIR")
  parser.add_argument("--score", default=None, metavar="STEPS",
                      help="only score checkpoints STEPS (comma-separated) of the run --out "
                      "on the run's selection suites (MetaConfig.selection_suites, default "
                      "validation; log meta-objective, informed; lower is better) -- how "
                      "release checkpoints are picked")
  parser.add_argument("--no-progress", action="store_true")
  parser.add_argument("--compile-cache", default=None, metavar="DIR",
                      help="persistent JAX compilation cache (default: .jax_cache next "
                      "to the run directory, or $JAX_COMPILATION_CACHE_DIR; '' disables)")
  parser.add_argument("--coordinator", default=None, help="host:port of process 0")
  parser.add_argument("--num-processes", type=int, default=None)
  parser.add_argument("--process-id", type=int, default=None)
  return parser


def _config_and_out(args: argparse.Namespace):
  """The run's MetaConfig (``--config`` or the resumed run's, then ``--set`` and
  ``--task``) and its directory."""
  resumed = _resumed_run(args.out) if args.resume else None
  config = _with_flags(_base_config(args.config, resumed), args)
  if config.task_factories and os.getcwd() not in sys.path:
    sys.path.append(os.getcwd())  # `--task mymodule:factory` from the user's directory
  return config, resumed or _new_out(args.out)


def _resumed_run(where: str | None) -> pathlib.Path:
  """The newest checkpointed run under ``where`` (default runs/)."""
  from metaopt.meta import run  # pylint: disable=g-import-not-at-top
  where = where or "runs"
  out = run.newest_run(where)
  if out is None:
    hint = (" (it was stopped before its first checkpoint: start it again without "
            "--resume)" if run.is_run(where) else "")
    raise _UsageError(f"--resume: no checkpointed run under {where}{hint}")
  return out


def _base_config(name: str | None, resumed: pathlib.Path | None):
  """The resumed run's config (``--config``, if given, must agree with it), or the
  config ``name`` (a preset or a JSON file; default: the default preset)."""
  from metaopt.meta import checkpointing, config as config_lib, run  # pylint: disable=g-import-not-at-top
  try:
    if resumed is None:
      return config_lib.load_config(name or "default")
    config = checkpointing.config_from_checkpoint(resumed / run.CHECKPOINT_DIR)
    differ = name is not None and checkpointing.fields_differ(
        config_lib.load_config(name), config)
  except (ValueError, TypeError, checkpointing.CheckpointError) as e:
    raise _UsageError(f"{'--config' if resumed is None else '--resume'}: {_one_line(e)}"
                      ) from None
  if differ:
    raise _UsageError(f"--resume: --config {name} differs from the run in {resumed} in "
                      f"{differ}")
  return config


def _with_flags(config, args: argparse.Namespace):
  """``config`` with the ``--set`` changes and, for a new run, the ``--task`` factories
  (a resumed run rebuilds its own: ``--task`` may only repeat them)."""
  from metaopt.meta import config as config_lib  # pylint: disable=g-import-not-at-top
  try:
    config = config.replace(**config_lib.parse_overrides(args.set)) if args.set else config
  except (TypeError, ValueError) as e:
    raise _UsageError(f"--set: {_one_line(e)}") from None
  if args.resume and args.task and tuple(args.task) != config.task_factories:
    raise _UsageError(f"--resume: --task {args.task} differs from the run's task "
                      f"factories {list(config.task_factories)} (a resumed run rebuilds "
                      "its own)")
  if args.resume or not args.task:
    return config
  try:
    return config.replace(task_factories=config.task_factories + tuple(args.task))
  except ValueError as e:
    raise _UsageError(f"--task: {_one_line(e)}") from None


def _new_out(out: str | None) -> pathlib.Path:
  """The directory of a new run: ``--out``, or runs/<timestamp>."""
  from metaopt.meta import run  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(out) if out else pathlib.Path("runs") / _timestamp()
  problem = _out_problem(path, run)
  if problem:
    raise _UsageError(f"--out: {problem}")
  return path


def _train(config, out: pathlib.Path, args: argparse.Namespace) -> int:
  """Meta-trains with SIGTERM handled like Ctrl-C; returns the exit status."""
  from metaopt.meta import run, sharding  # pylint: disable=g-import-not-at-top
  from tasks import TaskFactoryError  # pylint: disable=g-import-not-at-top
  main_thread = threading.current_thread() is threading.main_thread()
  previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
  # SIGINT raises KeyboardInterrupt even where it arrived ignored: a shell starts
  # background jobs (`cmd &` without job control, nohup in scripts) with SIGINT set
  # to SIG_IGN, and Python then installs no handler, so `kill -INT` did nothing.
  previous_int = (signal.signal(signal.SIGINT, signal.default_int_handler)
                  if main_thread else None)
  try:
    result = run.meta_train(config, out, resume=args.resume,
                            progress=not args.no_progress, plot=args.plot)
  except run.Interrupted as e:
    if sharding.is_primary():
      print(f"interrupted by {e}", file=sys.stderr)
    return e.exit_code
  except KeyboardInterrupt as e:  # before the first outer step: nothing new to save
    if sharding.is_primary():
      print(f"interrupted by {'SIGTERM' if isinstance(e, run.Terminated) else 'SIGINT'} "
            "before the first outer step; nothing new was saved", file=sys.stderr)
    return 143 if isinstance(e, run.Terminated) else 130
  except FileExistsError as e:
    raise _UsageError(f"--out: {_one_line(e)}") from None
  except TaskFactoryError as e:
    where = (f"--resume: cannot rebuild a task of the run in {out} ({run.CONFIG_FILE} "
             "task_factories)" if args.resume else "--task")
    raise _UsageError(f"{where}: {_one_line(e)}") from None
  finally:
    if main_thread:
      signal.signal(signal.SIGTERM, previous)
      signal.signal(signal.SIGINT, previous_int)
  if sharding.is_primary():
    print(_done_line(result.out / run.FINAL_DIR, result.summary))
  return 0


def _done_line(artifact: pathlib.Path, s: dict) -> str:
  """What a finished run prints: the artifact, steps, times and validation."""
  line = (f"done: {artifact} ({s['step']} outer steps, {s['wall_s']} s "
          f"+ {s['compile_s']} s compiling)")
  if "final" not in s:
    return line
  return (f"{line}; validation meta-objective on {s['validation_task']}: informed "
          f"{s['warm_start']['informed']['meta_loss']:.4f} -> "
          f"{s['final']['informed']['meta_loss']:.4f}, blind "
          f"{s['warm_start']['blind']['meta_loss']:.4f} -> "
          f"{s['final']['blind']['meta_loss']:.4f}")


def _export(out: str | None, step: int, dest: str | None) -> int:
  """Writes checkpoint ``step`` of run ``out`` as an LO artifact at ``dest``."""
  from metaopt.meta import checkpointing, run  # pylint: disable=g-import-not-at-top
  if not out:
    raise _UsageError("--export needs --out RUN (the run directory)")
  dest = dest or pathlib.Path(out) / f"step_{step}"
  try:
    run.export_checkpoint(out, step, dest)
  except (ValueError, FileExistsError, checkpointing.CheckpointError) as e:
    raise _UsageError(f"--export: {e}") from None
  print(f"wrote {dest}")
  return 0


def _score(out: str | None, steps_arg: str) -> int:
  """Prints the validation-suite score of each listed checkpoint of run ``out``."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from metaopt.meta import checkpointing, run, validation  # pylint: disable=g-import-not-at-top
  try:
    steps = [int(s) for s in steps_arg.split(",")]
  except ValueError:
    raise _UsageError(f"--score {steps_arg!r}: expected comma-separated outer steps"
                      ) from None
  if not out:
    raise _UsageError("--score needs --out RUN (the run directory)")
  try:
    loaded = {str(s): run.checkpoint_lo(out, s) for s in steps}
  except (ValueError, checkpointing.CheckpointError) as e:
    raise _UsageError(f"--score: {e}") from None
  los = {k: lo for k, (lo, _) in loaded.items()}
  config = next(iter(los.values())).config
  run_config = next(iter(loaded.values()))[1].get("config", {})
  entries = validation.selection_entries(run_config.get("selection_suites", ["validation"]))
  scores = validation.score_thetas(config, {k: lo.theta for k, lo in los.items()}, entries)
  labels = list(los)
  print("| task | " + " | ".join(f"step {k}" for k in labels) + " |")
  print("|---" * (len(labels) + 1) + "|")
  for name, row in scores.items():
    print(f"| {name} | " + " | ".join(f"{row[k]:.4f}" for k in labels) + " |")
  first = labels[0]
  for k in labels:
    diffs = [row[k] - row[first] for row in scores.values()]
    print(f"step {k}: mean {np.mean(diffs):+.4f}, worst {np.max(diffs):+.4f} vs step {first}")
  return 0


def _one_line(error: BaseException) -> str:
  return " ".join(str(error).split())


def _raise_terminated(signum, frame) -> None:
  """SIGTERM (how schedulers preempt a job) unwinds like Ctrl-C: checkpoint, then exit."""
  del signum, frame
  from metaopt.meta import run  # pylint: disable=g-import-not-at-top
  raise run.Terminated()


def _out_problem(out: pathlib.Path, run) -> str | None:
  """Why a new run cannot be written to ``out`` (None: it can)."""
  if out.exists() and not out.is_dir():
    return f"{out} is a file; expected a run directory (new, empty or a run's)."
  if out.is_dir() and any(out.iterdir()) and not run.is_run(out):
    return (f"{out} exists and is not a meta-training run (no {run.CONFIG_FILE} or "
            f"{run.CHECKPOINT_DIR}/); refusing to write into it: choose a new or empty "
            "directory.")
  return None


def _compile_cache(directory: str | None, out: pathlib.Path) -> None:
  """Keeps compiled programs between runs: a second run or a resume starts in seconds."""
  import jax  # pylint: disable=g-import-not-at-top
  if directory is None:
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
      return
    directory = str(pathlib.Path(out).absolute().parent / ".jax_cache")
  if directory:
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _timestamp() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  now = int(time.time())
  if jax.process_count() > 1:  # every host must name the same directory
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    now = int(multihost_utils.broadcast_one_to_all(np.int64(now)))
  return time.strftime("%Y%m%d-%H%M%S", time.localtime(now))


if __name__ == "__main__":
  sys.exit(main())
