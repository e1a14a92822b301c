"""One meta-training run end to end: init or resume, outer steps, validation, export.

A run directory holds::

  config.json      the MetaConfig (the JSON format ``--config FILE`` reads)
  metrics.jsonl    one record per outer step, validation and the summary
  checkpoints/     orbax checkpoints (metaopt.meta.checkpointing)
  .lock            held (flock) by the process training in it: a second run is refused
  final/           the meta-trained LO, written by metaopt.checkpoint.save
  summary.json     validation of the warm start and the final theta
  meta_loss.png    with --plot
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import pathlib
import shutil
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

import metaopt
from metaopt.meta import checkpointing as ckpt
from metaopt.meta import logging as log_lib
from metaopt.meta import outer
from metaopt.meta import sharding as shard_lib
from metaopt.meta import stopping
from metaopt.meta.config import MetaConfig
from metaopt.meta.outer import MetaTrainer
from metaopt.meta.validation import make_evaluator

CONFIG_FILE = "config.json"
FINAL_DIR = "final"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = ".lock"
CORRUPT_DIR = "corrupt_checkpoints"  # where --resume moves checkpoints it skipped

Interrupted = stopping.Interrupted


class Terminated(KeyboardInterrupt):
  """For callers that turn SIGTERM into an exception: handled like Ctrl-C (the last
  step is checkpointed, then :class:`Interrupted` is raised). ``meta_train.py`` passes a
  :class:`~metaopt.meta.stopping.Stop` instead, which also works mid-compile."""


class RunLocked(RuntimeError):
  """Another process is meta-training in the same run directory."""


def lock_run(out: pathlib.Path):
  """Takes ``out/.lock`` (``fcntl.flock``, non-blocking) for this process and writes its
  pid there; returns the open file (closing it releases the lock, and so does the
  process's death: a stale lock file never blocks).

  Raises:
    RunLocked: another process holds it (the message names it).
  """
  out.mkdir(parents=True, exist_ok=True)
  f = open(out / LOCK_FILE, "a+")  # pylint: disable=consider-using-with
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    f.seek(0)
    holder = f.read().strip() or "unknown"
    f.close()
    raise RunLocked(f"{out} is in use by another meta-training process (pid {holder}); "
                    "wait for it to end or choose another --out.") from None
  f.seek(0)
  f.truncate()
  f.write(f"{os.getpid()}\n")
  f.flush()
  return f


@dataclasses.dataclass
class RunResult:
  """What :func:`meta_train` returns."""

  learned_optimizer: metaopt.LearnedOptimizer
  out: pathlib.Path
  summary: dict[str, Any]
  state: Any


class _Validator:
  """Scores theta on the validation task, informed and blind (compiled once)."""

  def __init__(self, trainer: MetaTrainer):
    c = trainer.config
    names = [t.name for t in trainer.tasks]
    if c.validation_task and c.validation_task not in names:
      raise ValueError(f"validation_task {c.validation_task!r} is not one of the run's "
                       f"tasks {names}.")
    task = trainer.tasks[names.index(c.validation_task) if c.validation_task else 0]
    self.task_name = task.name
    self.fns = {mode: make_evaluator(trainer.lo_config, task, num_steps=c.horizon,
                                     seeds=c.validation_seeds, informed=mode == "informed",
                                     loss_bound=c.loss_bound, seed=c.seed + 12345,
                                     log_loss=c.log_loss)
                for mode in ("informed", "blind")}

  def lower(self, theta) -> list:
    return [fn.lower(theta) for fn in self.fns.values()]

  def __call__(self, theta) -> dict[str, Any]:
    return {"task": self.task_name,
            **{mode: {k: float(v) for k, v in fn(theta).items()}
               for mode, fn in self.fns.items()}}


def run_tasks(config: MetaConfig, extra: Sequence[Any] = ()) -> list:
  """The config's tasks (:func:`~metaopt.meta.outer.resolve_tasks`) followed by
  ``extra`` (``tasks.Task`` objects); names must be unique."""
  import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  for t in extra:
    if not isinstance(t, tasks_lib.Task):
      raise TypeError(f"meta_train(tasks=...) has {type(t).__name__} {t!r:.60}; expected "
                      "tasks.Task objects (e.g. from tasks.from_functions).")
  task_list = outer.resolve_tasks(config) + list(extra)
  names = [t.name for t in task_list]
  repeated = sorted({n for n in names if names.count(n) > 1})
  if extra and repeated:
    raise ValueError(f"task names {repeated} appear more than once among the run's tasks "
                     f"{names}; expected unique names.")
  return task_list


def meta_train(config: MetaConfig, out: str | pathlib.Path, *, tasks: Sequence[Any] = (),
               resume: bool = False, progress: bool = True, plot: bool = False,
               stop: stopping.Stop | None = None, fallback: bool = True) -> RunResult:
  """Meta-trains (or resumes) the run in ``out``; returns the final LO and summary.

  ``tasks`` are ``tasks.Task`` objects trained next to the config's own (after them;
  with ``MetaConfig(suite="")`` alone). They are not recorded in ``config.json``: resume
  a run with the same ``tasks``, or name them in ``config.task_factories`` (what
  ``meta_train.py --task`` does) for a run that rebuilds them itself.

  ``stop`` (:class:`~metaopt.meta.stopping.Stop`): requests to stop (signals, a
  deadline), polled between phases and outer steps; a stop checkpoints the last finished
  step and raises :class:`Interrupted`. Without one, Ctrl-C in the outer loop does the
  same. ``fallback``: a resume whose newest checkpoint is corrupt continues from the
  newest intact one (moving the others to ``out/corrupt_checkpoints/``); False raises
  :class:`~metaopt.meta.checkpointing.CorruptCheckpointError` instead.

  Raises:
    RunLocked: another process is training in ``out``.
  """
  out = pathlib.Path(out).absolute()
  stop = stop or stopping.Stop()
  stop.set_run(out, out / CHECKPOINT_DIR)
  created = not out.exists()
  lock = lock_run(out) if shard_lib.is_primary() else None
  try:
    session, state = _start_or_resume(config, out, tasks, resume=resume,
                                      progress=progress, stop=stop, fallback=fallback)
    state, step, last_val = _outer_loop(session, state, stop)
    return _finish(session, state, step, last_val, plot=plot, stop=stop)
  except Exception:  # a failed write, say: the checkpoints already started still land
    if stop.checkpoints is not None:
      try:
        stop.checkpoints.wait()
      except Exception:  # pylint: disable=broad-except
        pass  # the error being raised says more
    if lock is not None and created and {p.name for p in out.iterdir()} == {LOCK_FILE}:
      lock.close()  # failed before writing anything (a bad task): leave no directory
      (out / LOCK_FILE).unlink()
      out.rmdir()
    raise
  finally:
    if lock is not None:
      lock.close()


@dataclasses.dataclass(frozen=True)
class _Session:
  """What the outer loop and the finish of a run share (made by _start_or_resume)."""

  config: MetaConfig
  out: pathlib.Path
  primary: bool  # this process writes the run's files
  trainer: MetaTrainer
  manager: Any  # the orbax CheckpointManager of out/checkpoints
  expected: dict[str, Any]  # run metadata saved with, and checked on, every checkpoint
  log: log_lib.MetricsLog
  bar: log_lib.Progress
  validate: _Validator | None
  warm: dict[str, Any] | None  # the warm start's validation
  compile_s: float
  started: float  # time.perf_counter() as the outer loop starts


def _start_or_resume(config: MetaConfig, out: pathlib.Path, tasks: Sequence[Any], *,
                     resume: bool, progress: bool, stop: stopping.Stop, fallback: bool
                     ) -> tuple[_Session, Any]:
  """Initializes the run in ``out`` or restores its newest intact checkpoint, compiles
  every program and validates the warm start; returns the session and the outer state.
  ``stop`` is polled between these phases."""
  primary = shard_lib.is_primary()
  stop.set_phase("building")
  trainer = MetaTrainer(config, task_list=run_tasks(config, tasks))  # before any write
  manager = ckpt.checkpoint_manager(out / CHECKPOINT_DIR, keep=config.keep_checkpoints)
  start = manager.latest_step()
  if start is not None and not resume:
    raise FileExistsError(f"{out} already holds checkpoints (last step {start}); pass "
                          "--resume to continue it or choose another --out.")
  expected = ckpt.run_metadata(config, trainer.lo_config, [t.name for t in trainer.tasks])
  stop.checkpoints = ckpt.RunCheckpoints(manager, expected,
                                         populations=config.checkpoint_populations)
  stop.watchdog_may_save = jax.process_count() == 1  # a save is collective
  log = log_lib.MetricsLog(out / log_lib.METRICS_FILE, enabled=primary)
  if primary:
    out.mkdir(parents=True, exist_ok=True)
    _write_atomically(out / CONFIG_FILE, config.to_json() + "\n")
  _poll(stop)
  validate = _Validator(trainer) if config.validation_every else None
  if start is None:
    state = trainer.init()
  else:
    stop.set_phase("restoring")
    state, start, manager = _restore(out, manager, trainer, expected, fallback, primary)
    stop.checkpoints.manager = manager
  bar = log_lib.Progress(config.outer_steps, start or 0, every=config.log_every,
                         enabled=progress and primary)
  _poll(stop)
  stop.set_phase("compiling")
  compile_s = _compile(trainer, validate, state, bar)
  _poll(stop)
  stop.set_phase("validating the warm start")
  if start is None:
    warm = _validate_warm_start(validate, state.theta, log, bar)
  else:
    warm = _log_resume(out, start, trainer, validate, log, bar)
  _poll(stop)
  stop.set_phase("stepping")
  return _Session(config, out, primary, trainer, manager, expected, log, bar, validate,
                  warm, compile_s, time.perf_counter()), state


def _poll(stop: stopping.Stop) -> None:
  """Ends the run here if a stop was requested (:meth:`Stop.finish` saves first)."""
  if stop.requested:
    raise stop.finish()


def _write_atomically(path: pathlib.Path, text: str) -> None:
  """Writes ``path`` through a temporary file renamed into place: a process killed
  mid-write leaves the old file (or none), never half of one."""
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  tmp.write_text(text)
  os.replace(tmp, path)


def _restore(out: pathlib.Path, manager, trainer: MetaTrainer, expected: dict[str, Any],
             fallback: bool, primary: bool) -> tuple[Any, int, Any]:
  """The newest intact checkpoint's state and step, and the manager to continue with.

  Newer corrupt checkpoints are moved to ``out/corrupt_checkpoints/`` (the resumed run
  writes those steps again) and one line says so.
  """
  state, start, skipped = ckpt.restore_newest(
      manager, trainer.abstract_state(), expected, fallback=fallback,
      init_populations=trainer.blank_populations)
  if not skipped:
    return state, start, manager
  if primary:
    (out / CORRUPT_DIR).mkdir(exist_ok=True)
    for step, _ in skipped:
      shutil.move(str(out / CHECKPOINT_DIR / str(step)),
                  str(out / CORRUPT_DIR / f"{step}.{int(time.time())}"))
    print(f"--resume: checkpoint step {skipped[0][0]} is corrupt or incomplete "
          f"({skipped[0][1][:300]}); resuming from step {start}, the newest intact one "
          f"(skipped steps {[s for s, _ in skipped]} moved to {out / CORRUPT_DIR})",
          file=sys.stderr, flush=True)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("metaopt.meta.run:fallback")
  return state, start, ckpt.checkpoint_manager(out / CHECKPOINT_DIR,
                                               keep=trainer.config.keep_checkpoints)


def _compile(trainer: MetaTrainer, validate: _Validator | None, state: Any,
             bar: log_lib.Progress) -> float:
  """Compiles the run's programs (outer step, validation) together; returns seconds."""
  lowered = trainer.lower_programs(state) + (validate.lower(state.theta) if validate else [])
  active = len(trainer.active_tasks(int(state.step)))
  bar.message(f"compiling {len(lowered)} programs ({active} tasks active of "
              f"{len(trainer.tasks)}; the others compile when drawn) ...")
  seconds = outer.compile_all(lowered)
  bar.message(f"compiled in {seconds:.1f} s")
  return seconds


def _validate_warm_start(validate: _Validator | None, theta: Any, log: log_lib.MetricsLog,
                         bar: log_lib.Progress) -> dict[str, Any] | None:
  """A new run's validation of its warm start (logged as step 0), or None."""
  if not validate:
    return None
  warm = validate(theta)
  log.write({"kind": "validation", "step": 0, "theta": "warm_start", **warm})
  bar.message(f"warm start on {warm['task']}: meta-objective informed "
              f"{warm['informed']['meta_loss']:.4f}, blind "
              f"{warm['blind']['meta_loss']:.4f}")
  return warm


def _log_resume(out: pathlib.Path, start: int, trainer: MetaTrainer,
                validate: _Validator | None, log: log_lib.MetricsLog,
                bar: log_lib.Progress) -> dict[str, Any] | None:
  """Drops the log's records after step ``start``, records the resume; returns the warm
  start's validation (from the log, else recomputed), or None."""
  log.truncate_after(start)
  log.write({"kind": "resume", "step": start, "devices": jax.device_count(),
             "processes": jax.process_count()})
  warm = None
  if validate:
    warm = _first_record(log, "warm_start") or validate(trainer.warm_theta)
  bar.message(f"resumed {out} at step {start}")
  return warm


def _outer_loop(session: _Session, state: Any, stop: stopping.Stop
                ) -> tuple[Any, int, dict[str, Any] | None]:
  """Outer steps to ``config.outer_steps`` with validation and checkpoints; returns the
  state, its step and the last validation (None if none ran).

  Raises:
    Interrupted: when ``stop`` is requested (or on Ctrl-C), after checkpointing the last
      finished step.
  """
  c, validate = session.config, session.validate
  step = int(state.step)
  if step:
    stop.finished_step(step, state)  # the restored step: on disk, saving it is a no-op
  last_val = None
  try:
    while step < c.outer_steps and not stop.requested:
      stop.set_phase("stepping")
      state = _prepare(session, state, step)
      state, metrics = session.trainer.step(state, prepared=True)
      step = metrics["step"]
      stop.finished_step(step, state)
      session.log.write({"kind": "train",
                         "time_s": round(time.perf_counter() - session.started, 3),
                         **metrics})
      session.bar.update(step, metrics["meta_loss"], f"log_lr {metrics['log_lr']:+.3f}")
      if (validate and (step % c.validation_every == 0 or step == c.outer_steps)
          and not stop.requested):
        stop.set_phase("validating")
        last_val = _validate_current(session, state.theta, step)
      if step % c.checkpoint_every == 0 or step == c.outer_steps:
        stop.set_phase("checkpointing")
        stop.save(step, state)
  except KeyboardInterrupt as e:  # Ctrl-C in a caller that passed no Stop
    stop.request("SIGTERM" if isinstance(e, Terminated) else "SIGINT")
  if stop.requested:
    session.bar.close_line()
    raise stop.finish() from None
  stop.set_phase("checkpointing")
  session.manager.wait_until_finished()
  return state, step, last_val


def _prepare(session: _Session, state: Any, step: int) -> Any:
  """The state with the step's tasks compiled and started; one line when a redraw of the
  family pools brought tasks not compiled or started before."""
  began = time.perf_counter()
  state, new = session.trainer.prepare(state)
  if new and step:
    session.bar.message(f"step {step}: {len(new)} newly drawn tasks compiled and started "
                        f"in {time.perf_counter() - began:.1f} s")
  return state


def _validate_current(session: _Session, theta: Any, step: int) -> dict[str, Any]:
  """Validation of theta at outer step ``step``, logged beside the warm start's."""
  val, warm = session.validate(theta), session.warm
  session.log.write({"kind": "validation", "step": step, "theta": "current", **val})
  session.bar.message(f"step {step}: validation meta-objective informed "
                      f"{val['informed']['meta_loss']:.4f} (warm start "
                      f"{warm['informed']['meta_loss']:.4f}), blind "
                      f"{val['blind']['meta_loss']:.4f} (warm start "
                      f"{warm['blind']['meta_loss']:.4f})")
  return val


def _finish(session: _Session, state: Any, step: int, last_val: dict[str, Any] | None, *,
            plot: bool, stop: stopping.Stop) -> RunResult:
  """Validates the final theta (unless the last step did), writes the summary, the LO
  artifact and the plot, and waits for every process."""
  stop.set_phase("finishing")
  if session.validate and last_val is None:
    last_val = session.validate(state.theta)
  _poll(stop)
  lo = session.trainer.learned_optimizer(state)
  summary = _summary(session, step, last_val)
  if session.primary:
    session.log.write(summary)
    (session.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    export(lo, session.out / FINAL_DIR, {"config": session.config.to_dict(),
                                         "outer_steps": step, "summary": summary})
    if plot:
      session.bar.message(f"plot: {log_lib.plot_metrics(session.out)}")
  if jax.process_count() > 1:  # no host leaves before the export is written
    multihost_utils.sync_global_devices("metaopt.meta.run:done")
  return RunResult(lo, session.out, summary, state)


def _summary(session: _Session, step: int, last_val: dict[str, Any] | None
             ) -> dict[str, Any]:
  """The run's summary record: steps, times, devices, warm-start and final validation."""
  summary = {"kind": "summary", "step": step, "compile_s": round(session.compile_s, 1),
             "wall_s": round(time.perf_counter() - session.started, 1),
             "devices": jax.device_count(), "processes": jax.process_count()}
  if session.validate:
    warm = session.warm
    summary.update(validation_task=warm["task"],
                   warm_start={m: warm[m] for m in ("informed", "blind")},
                   final={m: last_val[m] for m in ("informed", "blind")})
  return summary


def export(lo: metaopt.LearnedOptimizer, path: pathlib.Path, meta_training: dict) -> None:
  """Writes the LO artifact with :func:`metaopt.checkpoint.save` (call on one process).

  The artifact is host numpy arrays written by this process alone: in a multi-host run
  it is saved with a checkpointer that synchronizes only this process.
  """
  lo = lo.with_theta(jax.tree.map(np.asarray, lo.theta))
  metaopt.checkpoint.save(lo, path, overwrite=True, meta_training=meta_training,
                          checkpointer=_this_process_checkpointer())


def _this_process_checkpointer() -> Any:
  """An orbax checkpointer that involves only this process (None with one process:
  :func:`metaopt.checkpoint.save`'s default)."""
  if jax.process_count() == 1:
    return None
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  solo = ocp.options.MultiprocessingOptions(
      primary_host=jax.process_index(), active_processes={jax.process_index()},
      barrier_sync_key_prefix=f"metaopt_export_{jax.process_index()}")
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=solo),
                          multiprocessing_options=solo)


def export_checkpoint(run_dir: str | pathlib.Path, step: int,
                      path: str | pathlib.Path) -> metaopt.LearnedOptimizer:
  """Writes theta of checkpoint ``step`` of the run in ``run_dir`` as an LO artifact.

  How a release is cut from a run: validation picks an outer step (not necessarily
  the last), and that step's theta becomes a ``metaopt.load``-able artifact at ``path``.
  """
  lo, meta = checkpoint_lo(run_dir, step)
  export(lo, pathlib.Path(path), {"config": meta["config"], "outer_steps": step,
                                  "tasks": meta["tasks"]})
  return lo


def checkpoint_lo(run_dir: str | pathlib.Path, step: int
                  ) -> tuple[metaopt.LearnedOptimizer, dict[str, Any]]:
  """The LO of checkpoint ``step`` of a run, and that checkpoint's run metadata."""
  run_dir = pathlib.Path(run_dir).absolute()
  manager = ckpt.checkpoint_manager(run_dir / CHECKPOINT_DIR, keep=1 << 30)
  steps = sorted(manager.all_steps())
  if step not in steps:
    raise ValueError(f"{run_dir} has no checkpoint at outer step {step}; it has "
                     f"{steps or 'none'}.")
  meta = ckpt.read_metadata(manager, step)
  theta = {k: np.asarray(v, np.float32) for k, v in ckpt.restore_theta(manager, step).items()}
  return metaopt.LearnedOptimizer(metaopt.LOConfig.from_dict(meta["lo_config"]), theta), meta


def _first_record(log: log_lib.MetricsLog, theta: str) -> dict[str, Any] | None:
  if not log.path.exists():
    return None
  for r in log_lib.read_metrics(log.path):
    if r.get("kind") == "validation" and r.get("theta") == theta:
      return r
  return None


def is_run(directory: str | pathlib.Path) -> bool:
  """Whether ``directory`` was made by :func:`meta_train`: it has checkpoints/ or a
  config.json that is a MetaConfig (someone else's config.json does not count)."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    return False
  if (directory / CHECKPOINT_DIR).is_dir():
    return True
  try:
    MetaConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
  except (OSError, ValueError, TypeError, RecursionError):
    return False
  return True


def _newest_checkpoint_time(run: pathlib.Path) -> float | None:
  """mtime of the run's newest finished checkpoint (orbax names them by step), or None."""
  ckpts = run / CHECKPOINT_DIR
  steps = [p for p in ckpts.iterdir() if p.name.isdigit() and p.is_dir()] \
      if ckpts.is_dir() else []
  return max((p.stat().st_mtime for p in steps), default=None)


def newest_run(parent: str | pathlib.Path) -> pathlib.Path | None:
  """The resumable run (at least one finished checkpoint) under ``parent``, itself or
  the subdirectory with the newest checkpoint; None when there is none. Runs stopped
  before their first checkpoint are skipped."""
  parent = pathlib.Path(parent)
  if _newest_checkpoint_time(parent) is not None:
    return parent
  runs = [p for p in parent.iterdir() if _newest_checkpoint_time(p) is not None] \
      if parent.is_dir() else []
  return max(runs, key=_newest_checkpoint_time, default=None)
