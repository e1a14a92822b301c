"""Locates files that ship with metaopt (released learned-optimizer checkpoints)."""

from __future__ import annotations

import importlib.util
import pathlib

# The top-level ``checkpoints/`` folder of the repository is installed as this package
# (see setup.py), so a wheel carries it inside site-packages.
CHECKPOINTS_PACKAGE = "metaopt_checkpoints"


def checkpoints_dir() -> pathlib.Path:
  """Returns the folder holding the released checkpoints (``<name>/`` subfolders).

  Works in the three ways metaopt runs:

  * from a source checkout (``metaopt`` imported from the repository, installed in
    editable mode or not): the repository's ``checkpoints/`` folder;
  * from a wheel: ``site-packages/metaopt_checkpoints``.

  Nothing is imported (``find_spec`` only), so no bytecode lands in the folder.

  Raises:
    FileNotFoundError: when neither location exists (a broken install).
  """
  repo_root = pathlib.Path(__file__).resolve().parent.parent
  if (repo_root / "pyproject.toml").is_file() and (repo_root / "checkpoints").is_dir():
    return repo_root / "checkpoints"
  spec = importlib.util.find_spec(CHECKPOINTS_PACKAGE)
  if spec is not None and spec.submodule_search_locations:
    return pathlib.Path(next(iter(spec.submodule_search_locations)))
  raise FileNotFoundError(
      f"metaopt's checkpoint folder is missing: neither {repo_root / 'checkpoints'} nor "
      f"the package {CHECKPOINTS_PACKAGE!r} exists. Reinstall metaopt.")
