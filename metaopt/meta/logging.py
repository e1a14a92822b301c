"""Metrics out of a run: JSONL log, terminal progress bar or plain lines, PNG curves.

Only process 0 writes (see :func:`metaopt.meta.sharding.is_primary`). Each JSONL line
is one record: ``{"kind": "train", "step", "meta_loss", ...}`` per outer step,
``{"kind": "validation", "step", "theta": "current"|"warm_start", ...}`` per
evaluation, ``{"kind": "resume", "step"}`` where a run was resumed (records of later
steps are dropped first: the resumed run writes them again), ``{"kind": "summary", ...}``
at the end.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time
from typing import Any, TextIO

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
  """Appends JSON records to ``<run>/metrics.jsonl``."""

  def __init__(self, path: str | pathlib.Path, *, enabled: bool = True):
    self.path = pathlib.Path(path)
    self.enabled = enabled

  def truncate_after(self, step: int) -> None:
    """Drops records of steps after ``step`` (they are redone by a resumed run), and a
    line cut short by a process killed mid-write."""
    if not self.enabled or not self.path.exists():
      return
    keep = [line for line in self.path.read_text().splitlines()
            if (record := _parse(line)) is not None and record.get("step", 0) <= step]
    tmp = self.path.with_name(f".{self.path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(self.path)

  def write(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    with self.path.open("a") as f:
      f.write(json.dumps(record, sort_keys=True) + "\n")


def _parse(line: str) -> dict[str, Any] | None:
  try:
    record = json.loads(line)
  except json.JSONDecodeError:
    return None
  return record if isinstance(record, dict) else None


def read_metrics(path: str | pathlib.Path) -> list[dict[str, Any]]:
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / METRICS_FILE
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
  """A one-line progress bar on a terminal, plain log lines otherwise.

  ETA is measured from the second update on (the first step includes compilation).
  """

  def __init__(self, total: int, start: int = 0, *, stream: TextIO | None = None,
               every: int = 10, enabled: bool = True, width: int = 24):
    self.total, self.start = total, start
    self.stream = stream or sys.stderr
    self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
    self.every, self.enabled, self.width = every, enabled, width
    self._t0: float | None = None
    self._s0 = start

  def eta(self, step: int) -> float:
    if self._t0 is None or step <= self._s0:
      return math.inf
    rate = (time.perf_counter() - self._t0) / (step - self._s0)
    return rate * (self.total - step)

  def update(self, step: int, meta_loss: float, extra: str = "") -> None:
    if self._t0 is None:
      self._t0, self._s0 = time.perf_counter(), step
    if not self.enabled:
      return
    text = (f"{step}/{self.total} meta-loss {meta_loss:.4f} "
            f"ETA {format_duration(self.eta(step))}" + (f" {extra}" if extra else ""))
    if self.tty:
      filled = int(self.width * step / max(self.total, 1))
      bar = "#" * filled + "." * (self.width - filled)
      self.stream.write(f"\r[{bar}] {text}\x1b[K")
      if step >= self.total:
        self.stream.write("\n")
    elif step % self.every == 0 or step >= self.total or step == self.start + 1:
      self.stream.write(f"step {text}\n")
    self.stream.flush()

  def close_line(self) -> None:
    """Ends a half-drawn bar line (before an interruption's message)."""
    if self.enabled and self.tty:
      self.stream.write("\n")
      self.stream.flush()

  def message(self, text: str) -> None:
    if not self.enabled:
      return
    self.stream.write(("\r\x1b[K" if self.tty else "") + text + "\n")
    self.stream.flush()


def plot_metrics(run: str | pathlib.Path, out: str | pathlib.Path | None = None,
                 smooth: int = 20) -> pathlib.Path:
  """Draws the meta-loss curves of a run (``metrics.jsonl``) to a PNG; returns its path.

  Left: the training meta-loss per step (light) and its running mean over ``smooth``
  steps. Right: the validation meta-objective of the current theta against the warm
  start's, informed and blind.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  run = pathlib.Path(run)
  records = read_metrics(run)
  out = pathlib.Path(out) if out else (run if run.is_dir() else run.parent) / "meta_loss.png"
  train = [r for r in records if r.get("kind") == "train"]
  val = [r for r in records if r.get("kind") == "validation"]
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
  steps = [r["step"] for r in train]
  losses = [r["meta_loss"] for r in train]
  ax0.plot(steps, losses, alpha=0.3, lw=0.8, label="per step")
  if losses:
    k = max(1, min(smooth, len(losses)))
    means = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
             for i in range(len(losses))]
    ax0.plot(steps, means, lw=1.8, label=f"running mean ({k})")
  ax0.set(xlabel="outer step", ylabel="meta-loss (normalized train loss)",
          title="training meta-loss")
  ax0.legend()
  for mode in ("informed", "blind"):
    cur = [(r["step"], r[mode]["meta_loss"]) for r in val
           if r.get("theta") == "current" and mode in r]
    if cur:
      ax1.plot(*zip(*cur), marker="o", label=f"theta ({mode})")
    warm = [r[mode]["meta_loss"] for r in val if r.get("theta") == "warm_start" and mode in r]
    if warm:
      ax1.axhline(warm[0], ls="--", color="gray" if mode == "informed" else "silver",
                  label=f"warm start ({mode})")
  ax1.set(xlabel="outer step", ylabel="meta-objective over the full horizon",
          title="validation")
  if val:
    ax1.legend()
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out
