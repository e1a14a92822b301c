"""Progress over training runs: a bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
  """Counts finished runs; ``update`` with a message after each batch of runs."""

  def __init__(self, total: int, *, stream: TextIO | None = None, enabled: bool = True):
    self.total, self.done, self.stream = total, 0, stream or sys.stderr
    self.enabled = enabled
    self.start = time.perf_counter()
    self._bar = None
    if enabled and self.stream.isatty():
      try:
        import tqdm  # pylint: disable=g-import-not-at-top
        self._bar = tqdm.tqdm(total=total, unit="run", file=self.stream,
                              dynamic_ncols=True)
      except ImportError:
        pass

  def update(self, runs: int, message: str) -> None:
    self.done += runs
    if self._bar is not None:
      self._bar.set_description_str(message[:60])
      self._bar.update(runs)
    elif self.enabled:
      elapsed = time.perf_counter() - self.start
      print(f"[{self.done}/{self.total} runs, {elapsed:.0f}s] {message}", file=self.stream,
            flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
