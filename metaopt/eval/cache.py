"""One JSON file per finished training run, so an interrupted evaluation resumes.

Layout: ``<root>/<task>-<hash>/<optimizer>-<hash>/<schedule>_lr<lr>_seed<seed>.json``.
The task hash covers its config and step budget, the optimizer hash its identity (the
learned optimizer's theta digest included) and the sweep settings that change a run,
so a changed setting never reuses a stale run. Files are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import tempfile
from typing import Any

FORMAT = 2  # bump when a run's stored results change meaning


def _digest(*parts: Any) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()
                        ).hexdigest()[:10]


def _slug(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


class RunCache:
  """Per-run result files under ``root``."""

  def __init__(self, root: str | os.PathLike):
    self.root = pathlib.Path(root)

  def path(self, task_id: tuple[str, str], optimizer_id: tuple[str, str], schedule: str,
           lr: float, seed: int) -> pathlib.Path:
    """File of one run; ids are ``(readable name, identity string)`` pairs."""
    task_dir = f"{_slug(task_id[0])}-{_digest(FORMAT, task_id)}"
    opt_dir = f"{_slug(optimizer_id[0])}-{_digest(FORMAT, optimizer_id)}"
    return self.root / task_dir / opt_dir / f"{schedule}_lr{lr:.4g}_seed{seed}.json"

  def load(self, path: pathlib.Path) -> dict | None:
    """The stored record, or None when absent or unreadable (then it is recomputed)."""
    try:
      return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
      return None

  def save(self, path: pathlib.Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
      json.dump(record, f)
    os.replace(tmp, path)

  def files(self) -> list[pathlib.Path]:
    return sorted(self.root.glob("*/*/*.json"))
