"""Stopping a meta-training run on time: a deadline, SIGINT or SIGTERM, in every phase.

A Python signal handler runs only between bytecodes of the main thread: it cannot
interrupt an XLA compile, a long device computation or an orbax write, and an exception
raised from it lands wherever the main thread happens to be (inside a checkpoint save,
inside the handling of the previous signal). So here a signal or the deadline only
*requests* a stop (:meth:`Stop.request`; later requests are counted and ignored), and

* the main thread polls the request between phases and after every outer step; it then
  checkpoints the last finished step (a no-op when that step is already on disk), waits
  for the write, and ends the run with one line (:class:`Interrupted`);
* a watchdog thread (:meth:`Stop.start_watchdog`) makes sure the process is gone within
  :data:`HARD_LIMIT_S` of the request whatever the main thread is doing. In a phase the
  main thread cannot leave (building, restoring, compiling, validating the warm start)
  it acts after :data:`SETTLE_S`; while stepping or validating it gives the main thread
  :data:`GRACE_S` to reach its poll, then checkpoints the last finished step itself;
  then it prints the line and calls ``os._exit`` (128 + the signal number; 0 for the
  deadline). Nothing it skips is lost: orbax writes a checkpoint into a temporary
  directory renamed into place when complete, so the previous checkpoints stay intact.

The line always reports the newest *finished* checkpoint found on disk, so it stays true
whichever thread wrote it and however many signals arrived.
"""

from __future__ import annotations

import os
import pathlib
import signal
import sys
import threading
import time
from typing import Any, Callable

GRACE_S = 3.0  # stepping/validating: time for the main thread to reach its poll
SETTLE_S = 0.5  # phases the main thread cannot leave: act almost at once
HARD_LIMIT_S = 8.5  # the process is gone this long after the request, at the latest
DEADLINE = "deadline"

# Phases: where the main thread is. Those it cannot leave early are listed here.
UNINTERRUPTIBLE = ("building", "restoring", "compiling", "validating the warm start")
_PHASE_WORDS = {"stepping": "", "stopping": "", "building": "while building the run",
                "restoring": "while restoring the checkpoint", "compiling": "while compiling",
                "validating the warm start": "while validating the warm start",
                "validating": "while validating", "checkpointing": "while checkpointing",
                "finishing": "while writing the final artifact"}


class Interrupted(KeyboardInterrupt):
  """Meta-training stopped by SIGINT, SIGTERM or the deadline (``--stop-after``).

  ``str(e)`` is the one line the CLI prints.

  Attributes:
    step: the newest outer step checkpointed on disk (``--resume`` continues from it),
      or None when nothing was.
    out: the run directory (None when the stop came before it was known).
    signal_name: ``"SIGINT"``, ``"SIGTERM"`` or ``"deadline"``.
  """

  def __init__(self, line: str, step: int | None, out: pathlib.Path | None,
               signal_name: str):
    super().__init__(line)
    self.step, self.out, self.signal_name = step, out, signal_name

  @property
  def exit_code(self) -> int:
    return exit_code(self.signal_name)


def exit_code(reason: str) -> int:
  """The shell's convention for a signal, 128 + its number (130 SIGINT, 143 SIGTERM);
  0 for a stop at the deadline (the run did what it was asked to)."""
  if reason == DEADLINE:
    return 0
  return 128 + int(getattr(signal, reason))


def steps_on_disk(checkpoint_dir: pathlib.Path | None) -> list[int]:
  """Finished orbax checkpoints under ``checkpoint_dir`` (unfinished ones are
  temporary directories with a suffix), oldest first."""
  if checkpoint_dir is None or not checkpoint_dir.is_dir():
    return []
  return sorted(int(p.name) for p in checkpoint_dir.iterdir()
                if p.name.isdigit() and p.is_dir())


class Stop:
  """A thread-safe stop request and what is needed to honor it (see the module doc).

  Args:
    deadline: ``time.monotonic()`` value to stop at (None: no deadline).
    stop_after: the ``--stop-after`` seconds, for the message.
    exit_fn: how the watchdog ends the process (``os._exit``; tests pass a recorder).
    stream: where the line goes (stderr).
  """

  def __init__(self, *, deadline: float | None = None, stop_after: float | None = None,
               exit_fn: Callable[[int], Any] = os._exit, stream=None,
               grace_s: float = GRACE_S, settle_s: float = SETTLE_S,
               hard_limit_s: float = HARD_LIMIT_S):
    self.deadline, self.stop_after = deadline, stop_after
    self._exit_fn, self._stream = exit_fn, stream
    self.grace_s, self.settle_s, self.hard_limit_s = grace_s, settle_s, hard_limit_s
    self._lock = threading.RLock()
    self._save_lock = threading.Lock()
    self._wake = threading.Event()  # set by a request or by close()
    self._closed = threading.Event()
    self.reason: str | None = None
    self.requested_at: float | None = None
    self.ignored = 0  # requests after the first (a second Ctrl-C)
    self.phase = "building"
    self.out: pathlib.Path | None = None
    self.checkpoints = None  # metaopt.meta.checkpointing.RunCheckpoints, once known
    self.watchdog_may_save = True
    self._pending: tuple[int, Any] | None = None  # the last finished outer step
    self._reported: str | None = None
    self._save_error: str | None = None
    self._checkpoint_dir: pathlib.Path | None = None
    self._thread: threading.Thread | None = None

  # --------------------------------------------------------------- requests
  def request(self, reason: str) -> None:
    """Asks the run to stop (signal handlers call this: it only sets a flag)."""
    with self._lock:
      if self.reason is not None:
        self.ignored += 1
        return
      self.reason, self.requested_at = reason, time.monotonic()
    self._wake.set()

  @property
  def requested(self) -> bool:
    return self.reason is not None

  def handle_signal(self, signum, frame) -> None:
    """A ``signal.signal`` handler: requests a stop named after the signal."""
    del frame
    self.request(signal.Signals(signum).name)

  # --------------------------------------------------------------- progress
  def set_phase(self, phase: str) -> None:
    if phase not in _PHASE_WORDS:
      raise ValueError(f"unknown phase {phase!r}; expected one of {sorted(_PHASE_WORDS)}.")
    self.phase = phase

  def set_run(self, out: pathlib.Path, checkpoint_dir: pathlib.Path) -> None:
    """The run directory and where its checkpoints go (for the line)."""
    self.out, self._checkpoint_dir = out, checkpoint_dir

  def finished_step(self, step: int, state: Any) -> None:
    """Records an outer step the main thread finished (what a stop checkpoints)."""
    self._pending = (step, state)

  def save(self, step: int, state: Any, *, wait: bool = False) -> None:
    """Checkpoints ``state`` at ``step`` (a no-op if on disk), one writer at a time."""
    with self._save_lock:
      self.checkpoints.save(step, state)
      if wait:
        self.checkpoints.wait()

  # --------------------------------------------------------------- ending
  def newest_saved(self) -> int | None:
    steps = steps_on_disk(self._checkpoint_dir)
    return steps[-1] if steps else None

  def line(self) -> str:
    """What the run prints as it stops: the reason, the phase, what is saved."""
    who = (f"stopped at the --stop-after deadline ({self.stop_after:g} s)"
           if self.reason == DEADLINE else f"interrupted by {self.reason}")
    words = _PHASE_WORDS.get(self.phase, "")
    who += f" {words}" if words else ""
    saved = self.newest_saved()
    if saved is None:
      why = ("no outer step had finished" if self._pending is None else
             f"step {self._pending[0]}'s checkpoint: "
             f"{self._save_error or 'did not finish in time'}")
      return f"{who}: nothing was saved ({why})"
    line = f"{who}: saved step {saved}; continue with --resume --out {self.out}"
    pending = self._pending[0] if self._pending else None
    if pending is not None and pending > saved:
      why = self._save_error or "did not finish in time"
      line += f" (step {pending}'s checkpoint: {why})"
    return line

  def finish(self) -> Interrupted:
    """The main thread's way out: checkpoints the last finished step, waits for every
    write, returns the :class:`Interrupted` to raise (its text is the line)."""
    self.phase = "stopping" if self.phase not in UNINTERRUPTIBLE else self.phase
    if self._pending is not None and self.checkpoints is not None:
      self.save(*self._pending, wait=True)
    elif self.checkpoints is not None:
      with self._save_lock:
        self.checkpoints.wait()
    return Interrupted(self.line(), self.newest_saved(), self.out, self.reason)

  def report(self, line: str | None = None) -> bool:
    """Prints the line once (the main thread and the watchdog may both try)."""
    with self._lock:
      if self._reported is not None:
        return False
      self._reported = line or self.line()
    stream = self._stream or sys.stderr
    print(self._reported, file=stream, flush=True)
    return True

  @property
  def exit_code(self) -> int:
    return exit_code(self.reason)

  # --------------------------------------------------------------- watchdog
  def start_watchdog(self) -> None:
    """Starts the daemon thread that enforces the deadline and the hard limit."""
    self._thread = threading.Thread(target=self._watch, name="metaopt-stop-watchdog",
                                    daemon=True)
    self._thread.start()

  def close(self) -> None:
    """Stops the watchdog (the run ended normally, or in-process callers are done)."""
    self._closed.set()
    self._wake.set()
    if self._thread is not None and self._thread is not threading.current_thread():
      self._thread.join(timeout=1.0)

  def _watch(self) -> None:
    while not self._wake.is_set():
      timeout = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
      if not self._wake.wait(timeout) and not self._closed.is_set():
        self.request(DEADLINE)
    if self._closed.is_set():
      return
    hard = self.requested_at + self.hard_limit_s
    # Give the main thread its chance: at once for phases it cannot leave, a grace
    # period while it steps (it polls after the step), up to the hard limit when it is
    # already checkpointing or stopping.
    while not self._closed.wait(0.05):
      waited = time.monotonic() - self.requested_at
      if self.phase in UNINTERRUPTIBLE and waited >= self.settle_s:
        break
      if self.phase in ("stepping", "validating", "finishing") and waited >= self.grace_s:
        break
      if time.monotonic() >= hard:
        break
    if self._closed.is_set():
      return
    if (self.phase in ("stepping", "validating") and self._pending is not None
        and self.checkpoints is not None and self.watchdog_may_save):
      self._save_before(hard)
    self.report()
    for stream in (sys.stdout, sys.stderr):
      try:
        stream.flush()
      except Exception:  # pylint: disable=broad-except
        pass
    self._exit_fn(self.exit_code)

  def _save_before(self, hard: float) -> None:
    """Checkpoints the last finished step from this thread, giving up at ``hard``."""
    def save():
      try:
        self.save(*self._pending, wait=True)
      except Exception as e:  # pylint: disable=broad-except
        self._save_error = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    writer = threading.Thread(target=save, name="metaopt-stop-save", daemon=True)
    writer.start()
    writer.join(max(0.0, hard - time.monotonic()))
