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
  python meta_train.py --config lease --stop-after 780 --compile-cache cache  # a GPU lease
  python meta_train.py --out runs/mine --export all --export-to los  # every checkpoint

SIGINT, SIGTERM and the --stop-after deadline stop a run in any phase within 10 s,
checkpointing the last finished outer step, with one line. Exit status: 0 finished or
stopped at the deadline, 2 a usage error (bad flag or config, --out locked by another
run, a corrupt checkpoint with --no-fallback), 74 a failed write (disk full), 130/143
SIGINT/SIGTERM, 1 a bug.

Multi-host (every host runs the same command)::

  python meta_train.py --coordinator host0:1234 --num-processes 4 --process-id $I

(or ``$METAOPT_COORDINATOR``, ``$METAOPT_NUM_PROCESSES``, ``$METAOPT_PROCESS_ID``; on a
TPU pod ``--num-processes -1`` lets JAX detect the cluster). The config format is
documented in docs/meta_training.md.
"""

from __future__ import annotations

import argparse
import errno
import os
import pathlib
import signal
import sys
import threading
import time


def _process_age_s() -> float:
  """Seconds since this process started (the kernel's count; 0 where unknown)."""
  try:
    start_ticks = float(pathlib.Path("/proc/self/stat").read_text().rsplit(")", 1)[1]
                        .split()[19])
    uptime = float(pathlib.Path("/proc/uptime").read_text().split()[0])
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
  except (OSError, ValueError, IndexError):
    return 0.0


_STARTED = time.monotonic() - _process_age_s()  # --stop-after counts from here
CPU_DEVICES = 2  # --cpu-devices' default: the population over 2 CPU devices (README)
EXIT_USAGE = 2  # a mistake on the command line, a locked run, a corrupt checkpoint
EXIT_IO = 74  # a write failed (disk full, ...): sysexits.h EX_IOERR
_HARD_EXIT = False  # a stop ended the run: leave without waiting for library threads


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
    return _train(args)
  except _UsageError as e:
    print(e, file=sys.stderr)
    return EXIT_USAGE
  except Exception as e:  # pylint: disable=broad-except
    os_error = _os_error(e)  # orbax wraps the OSError of a failed write
    if os_error is None:
      raise
    print(_io_line(os_error), file=sys.stderr)
    return EXIT_IO


def _os_error(e: BaseException | None) -> OSError | None:
  """The OSError (with an errno) that ``e`` is or was caused by, if any."""
  seen = set()
  while e is not None and id(e) not in seen:
    if isinstance(e, OSError) and e.errno:
      return e
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return None


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
  parser.add_argument("--export", default=None, metavar="STEPS",
                      help="only write checkpoint STEP of the run --out as an LO artifact "
                      "in --export-to (default RUN/step_STEP); comma-separated steps or "
                      "'all' write DIR/step_STEP each (DIR: --export-to, default RUN)")
  parser.add_argument("--export-to", default=None, metavar="DIR")
  parser.add_argument("--score", default=None, metavar="STEPS",
                      help="only score checkpoints STEPS (comma-separated) of the run --out "
                      "on the run's selection suites (MetaConfig.selection_suites, default "
                      "validation; log meta-objective, informed; lower is better) -- how "
                      "release checkpoints are picked")
  parser.add_argument("--no-progress", action="store_true")
  parser.add_argument("--compile-cache", default=None, metavar="DIR",
                      help="persistent JAX compilation cache (default: .jax_cache next "
                      "to the run directory, or $JAX_COMPILATION_CACHE_DIR; '' disables); "
                      "every program is cached, however small")
  parser.add_argument("--autotune", action="store_true",
                      help="keep XLA's GPU autotuning on (off by default: "
                      "--xla_gpu_autotune_level=0 is added to XLA_FLAGS)")
  parser.add_argument("--cpu-devices", type=int, default=CPU_DEVICES, metavar="N",
                      help="without an accelerator, split the population over N CPU "
                      f"devices (default {CPU_DEVICES}: 1.2x PES steps/s on 2 cores, "
                      "benchmarks/meta_throughput.py); 1 keeps one; not applied where "
                      "XLA_FLAGS sets a device count or in a multi-process run")
  parser.add_argument("--stop-after", type=float, default=None, metavar="SECONDS",
                      help="stop SECONDS after the process started, in any phase, within "
                      "10 s: checkpoint the last finished outer step, print one line, "
                      "exit 0")
  parser.add_argument("--no-fallback", action="store_true",
                      help="with --resume, a corrupt newest checkpoint is an error (exit 2) "
                      "instead of resuming from the newest intact one")
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


def _train(args: argparse.Namespace) -> int:
  """Meta-trains; SIGINT, SIGTERM and the --stop-after deadline stop it the same way in
  every phase (metaopt.meta.stopping); returns the exit status."""
  global _HARD_EXIT
  if args.stop_after is not None and not args.stop_after > 0:
    raise _UsageError(f"--stop-after {args.stop_after}: expected seconds > 0")
  if args.cpu_devices < 1:
    raise _UsageError(f"--cpu-devices {args.cpu_devices}: expected an int >= 1")
  if not args.autotune:
    _autotune_off()
  # The variables metaopt.meta.sharding reads (ENV_COORDINATOR, ENV_NUM_PROCESSES),
  # named here because importing metaopt must wait for the stop handlers below.
  _split_cpu(args.cpu_devices, distributed=bool(
      args.coordinator or args.num_processes or os.environ.get("METAOPT_COORDINATOR")
      or os.environ.get("METAOPT_NUM_PROCESSES")))
  main_thread = threading.current_thread() is threading.main_thread()
  previous = {}
  if main_thread:  # importing metaopt (and JAX) takes seconds: be stoppable meanwhile
    for sig in (signal.SIGTERM, signal.SIGINT):
      previous[sig] = signal.signal(sig, _stop_while_starting)
  stop = None
  try:
    from metaopt.meta import stopping  # pylint: disable=g-import-not-at-top
    stop = stopping.Stop(
        deadline=None if args.stop_after is None else _STARTED + args.stop_after,
        stop_after=args.stop_after)
    if main_thread:
      # SIGINT is handled even where it arrived ignored: a shell starts background jobs
      # (`cmd &` without job control, nohup in scripts) with SIGINT set to SIG_IGN.
      for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop.handle_signal)
      stop.start_watchdog()
    return _train_until_stopped(args, stop)
  except KeyboardInterrupt as e:  # stopping.Interrupted
    if not hasattr(e, "exit_code"):
      raise
    if _is_primary():
      stop.report(str(e))
    _HARD_EXIT = main_thread
    return e.exit_code
  finally:
    if stop is not None:
      stop.close()
    for sig, handler in previous.items():
      signal.signal(sig, handler)


def _stop_while_starting(signum, frame) -> None:
  """A signal before the run's Stop exists (Python is still importing): nothing to
  save, nothing to wait for; one line and out."""
  del frame
  print(f"interrupted by {signal.Signals(signum).name} while starting: nothing new was "
        "saved", file=sys.stderr, flush=True)
  os._exit(128 + signum)


def _train_until_stopped(args: argparse.Namespace, stop) -> int:
  from metaopt.meta import checkpointing, run, sharding  # pylint: disable=g-import-not-at-top
  from tasks import TaskFactoryError  # pylint: disable=g-import-not-at-top
  sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  config, out = _config_and_out(args)
  stop.set_run(out.absolute(), out.absolute() / run.CHECKPOINT_DIR)
  _compile_cache(args.compile_cache, out)
  try:
    result = run.meta_train(config, out, resume=args.resume, stop=stop,
                            progress=not args.no_progress, plot=args.plot,
                            fallback=not args.no_fallback)
  except FileExistsError as e:
    raise _UsageError(f"--out: {_one_line(e)}") from None
  except run.RunLocked as e:
    raise _UsageError(f"--out: {_one_line(e)}") from None
  except checkpointing.CorruptCheckpointError as e:
    raise _UsageError(f"--resume: {_one_line(e)}"[:2000] +
                      (" (without --no-fallback the newest intact checkpoint is used)"
                       if args.no_fallback else "")) from None
  except TaskFactoryError as e:
    where = (f"--resume: cannot rebuild a task of the run in {out} ({run.CONFIG_FILE} "
             "task_factories)" if args.resume else "--task")
    raise _UsageError(f"{where}: {_one_line(e)}") from None
  if sharding.is_primary():
    print(_done_line(result.out / run.FINAL_DIR, result.summary))
  return 0


def _is_primary() -> bool:
  from metaopt.meta import sharding  # pylint: disable=g-import-not-at-top
  return sharding.is_primary()


def _autotune_off() -> None:
  """XLA's GPU autotuning off (it costs minutes of a lease at start-up and picks kernels
  for tiny problems where they barely differ); before JAX creates a backend. No effect
  on CPU; kept if XLA_FLAGS already sets a level."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_gpu_autotune_level" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_autotune_level=0".strip()


def _split_cpu(count: int, *, distributed: bool) -> None:
  """``count`` CPU devices (``--xla_force_host_platform_device_count``), before JAX
  creates a backend: the population is split over them and XLA:CPU runs each device's
  shard on its own thread, which on tiny inner tasks beats one device's intra-op
  threads (PES inner steps/s 1.2x on 2 cores, interleaved: README). Populations are
  always even, so 2 divides them. No effect with an accelerator (its devices are the
  ones used); not applied where ``XLA_FLAGS`` sets a count, in a multi-process run
  (each process's count is the launcher's choice) or once a backend exists (in-process
  calls, tests)."""
  flags = os.environ.get("XLA_FLAGS", "")
  bridge = sys.modules.get("jax._src.xla_bridge")
  started = bool(getattr(bridge, "_backends", None))
  if count > 1 and not distributed and not started and (
      "xla_force_host_platform_device_count" not in flags):
    os.environ["XLA_FLAGS"] = (f"{flags} --xla_force_host_platform_device_count={count}"
                               .strip())


def _io_line(e: OSError) -> str:
  """One line for a failed write: the path, the errno's message, what is safe."""
  name = errno.errorcode.get(e.errno, str(e.errno)) if e.errno else "?"
  what = e.strerror or _one_line(e)
  where = f"{e.filename}: " if e.filename else ""
  return (f"error: cannot write {where}{what} ({name}); files written before are intact "
          "(a run continues with --resume from its newest checkpoint)")


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


def _export(out: str | None, steps_arg: str, dest: str | None) -> int:
  """Writes checkpoints ``steps_arg`` (comma-separated or ``all``) of run ``out`` as LO
  artifacts: one step to ``dest`` (default RUN/step_STEP), several to DEST/step_STEP."""
  from metaopt.meta import checkpointing, run, stopping  # pylint: disable=g-import-not-at-top
  if not out:
    raise _UsageError("--export needs --out RUN (the run directory)")
  if steps_arg == "all":
    steps = stopping.steps_on_disk(pathlib.Path(out) / run.CHECKPOINT_DIR)
    if not steps:
      raise _UsageError(f"--export all: {out} has no checkpoint")
  else:
    try:
      steps = [int(s) for s in steps_arg.split(",")]
    except ValueError:
      raise _UsageError(f"--export {steps_arg!r}: expected an outer step, comma-separated "
                        "steps or 'all'") from None
  many = steps_arg == "all" or len(steps) > 1
  for step in steps:
    to = (pathlib.Path(dest or out) / f"step_{step}" if many or not dest
          else pathlib.Path(dest))
    try:
      run.export_checkpoint(out, step, to)
    except (ValueError, FileExistsError, checkpointing.CheckpointError) as e:
      raise _UsageError(f"--export: {_one_line(e)}") from None
    except OSError as e:
      print(f"--export: {_io_line(e)}", file=sys.stderr)
      return EXIT_IO
    print(f"wrote {to}")
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


def _out_problem(out: pathlib.Path, run) -> str | None:
  """Why a new run cannot be written to ``out`` (None: it can)."""
  if out.exists() and not out.is_dir():
    return f"{out} is a file; expected a run directory (new, empty or a run's)."
  if (out.is_dir() and any(p.name != run.LOCK_FILE for p in out.iterdir())
      and not run.is_run(out)):
    return (f"{out} exists and is not a meta-training run (no {run.CONFIG_FILE} or "
            f"{run.CHECKPOINT_DIR}/); refusing to write into it: choose a new or empty "
            "directory.")
  return None


def _compile_cache(directory: str | None, out: pathlib.Path) -> None:
  """Keeps compiled programs between runs: a second run or a resume starts in seconds.
  Every program is cached, however small or quick to compile (a lease's cache travels
  to the next machine: the init programs count too)."""
  import jax  # pylint: disable=g-import-not-at-top
  if directory is None:
    directory = (None if os.environ.get("JAX_COMPILATION_CACHE_DIR") else
                 str(pathlib.Path(out).absolute().parent / ".jax_cache"))
  elif directory:
    directory = str(pathlib.Path(directory).absolute())
  if directory:
    jax.config.update("jax_compilation_cache_dir", directory)
  if directory is None or directory:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _timestamp() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  now = int(time.time())
  if jax.process_count() > 1:  # every host must name the same directory
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    now = int(multihost_utils.broadcast_one_to_all(np.int64(now)))
  return time.strftime("%Y%m%d-%H%M%S", time.localtime(now))


if __name__ == "__main__":
  for _sig in (signal.SIGTERM, signal.SIGINT):  # until main() knows what it runs
    signal.signal(_sig, _stop_while_starting)
  _code = main()
  if _HARD_EXIT:  # stopped: the line is out and the checkpoint written; orbax's and
    sys.stdout.flush()  # other library threads must not hold the exit up (issue 24)
    sys.stderr.flush()
    os._exit(_code)
  sys.exit(_code)
