"""Learned-optimizer artifacts: orbax arrays plus versioned JSON metadata.

Layout of an artifact directory::

  <path>/metadata.json   format version, package version, LOConfig, feature and
                         candidate lists, theta shapes, meta-training config
  <path>/theta/          orbax checkpoint of theta (host numpy arrays, so it restores
                         on any device count)

Loading never executes code from the artifact: the metadata is plain JSON, validated
against this version of the code (format version, feature list, candidate list,
shapes) before the arrays are restored into a target built from the config.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import pathlib
import shutil
import sys
import tempfile
from typing import Any

import jax
import numpy as np

from metaopt import _resources
from metaopt._version import __version__
from metaopt.lopt import _network
from metaopt.lopt._config import LOConfig
from metaopt.lopt._learned import LearnedOptimizer

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
THETA_DIR = "theta"
MODEL_CARD_FILE = "MODEL_CARD.md"
ARTIFACT_KIND = "metaopt.LearnedOptimizer"
# What an artifact directory may hold: overwriting replaces all of it.
ARTIFACT_ENTRIES = (METADATA_FILE, THETA_DIR, MODEL_CARD_FILE)


class ArtifactError(ValueError):
  """The directory is not a (compatible) learned-optimizer artifact."""


def _checkpointer():
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp.PyTreeCheckpointer()


def save(lo: LearnedOptimizer, path: str | os.PathLike, *,
         meta_training: dict[str, Any] | None = None, overwrite: bool = False,
         checkpointer: Any = None) -> pathlib.Path:
  """Writes ``lo`` to the directory ``path`` (created; must not exist unless overwrite).

  ``checkpointer`` is the orbax checkpointer that writes theta (default
  ``orbax.checkpoint.PyTreeCheckpointer()``, which synchronizes every process of a
  multi-host run): a run that saves on one process only passes one restricted to it
  (``metaopt.meta.run.export`` does).

  The new artifact is written completely into a hidden sibling directory first. Without
  an existing artifact it is then renamed into place; with ``overwrite=True`` and an
  existing artifact at ``path`` the two directories are swapped by one atomic rename
  (``renameat2(RENAME_EXCHANGE)`` on Linux), so at every instant ``path`` holds one
  complete artifact, old or new, and a crash or ``SIGKILL`` mid-save leaves the old one
  intact. Where the exchange is unavailable (other systems, some network filesystems)
  the old artifact is first renamed to a hidden ``.<name>.old-*`` sibling, which is
  where it is found if the process dies between the two renames.

  ``overwrite=True`` replaces only a metaopt artifact: anything else at ``path`` (a
  file, a directory without ``metadata.json`` and ``theta/``, or an artifact directory
  holding other files) raises ``FileExistsError`` naming it, and nothing is deleted.
  Overwriting keeps an existing ``MODEL_CARD.md``.
  """
  path = pathlib.Path(path).absolute()
  if path.exists() or path.is_symlink():
    if not overwrite:
      raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
    _check_replaceable(path)
  theta = jax.tree.map(lambda a: np.asarray(jax.device_get(a), np.float32), lo.theta)
  metadata = {
      "format_version": FORMAT_VERSION,
      "package": "metaopt",
      "package_version": __version__,
      "kind": ARTIFACT_KIND,
      "config": lo.config.to_dict(),
      "features": list(lo.config.feature_names),
      "candidates": list(lo.config.candidate_names),
      "theta_shapes": {k: list(v) for k, v in _network.theta_shapes(lo.config).items()},
      "meta_training": meta_training if meta_training is not None else
                       lo.metadata.get("meta_training", {}),
      "info": {k: v for k, v in lo.metadata.items() if k != "meta_training"},
  }
  json.dumps(metadata)  # fail before writing anything if it is not JSON-able
  path.parent.mkdir(parents=True, exist_ok=True)
  if checkpointer is None:
    checkpointer = _checkpointer()
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.new-", dir=path.parent))
  try:
    checkpointer.save(tmp / THETA_DIR, theta)
    (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))
    if not path.exists():
      os.rename(tmp, path)
      return path
    card = path / MODEL_CARD_FILE
    if card.is_file():  # the card documents the artifact; re-saving must not lose it
      shutil.copy2(card, tmp / MODEL_CARD_FILE)
    _check_replaceable(path)  # again: it may have changed while theta was written
    _swap(tmp, path)  # from here on tmp holds the old artifact
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  shutil.rmtree(tmp, ignore_errors=True)
  return path


def is_artifact(path: str | os.PathLike) -> bool:
  """Whether ``path`` is a directory written by :func:`save` (metadata says metaopt)."""
  path = pathlib.Path(path)
  if path.is_symlink() or not path.is_dir() or not (path / THETA_DIR).is_dir():
    return False
  try:
    metadata = json.loads((path / METADATA_FILE).read_text())
  except (OSError, ValueError, RecursionError):
    return False
  return isinstance(metadata, dict) and metadata.get("kind") == ARTIFACT_KIND


def _check_replaceable(path: pathlib.Path) -> None:
  """Raises FileExistsError unless ``path`` is an artifact holding only artifact files."""
  if not is_artifact(path):
    raise FileExistsError(
        f"{path} exists and is not a metaopt learned-optimizer artifact (expected a "
        f"directory with {METADATA_FILE} and {THETA_DIR}/ written by "
        "metaopt.checkpoint.save); refusing to overwrite it.")
  other = sorted(p.name for p in path.iterdir() if p.name not in ARTIFACT_ENTRIES)
  if other:
    raise FileExistsError(f"{path} is an artifact but also holds {other[:5]}, which "
                          "overwriting would delete; refusing to overwrite it.")


def _swap(new: pathlib.Path, old: pathlib.Path) -> None:
  """Exchanges the directories ``new`` and ``old`` (``new`` then holds the old one)."""
  if _rename_exchange(new, old):
    return
  # No atomic exchange here: two renames, the old artifact parked beside the path.
  parked = pathlib.Path(tempfile.mkdtemp(prefix=f".{old.name}.old-", dir=old.parent))
  os.rename(old, parked / old.name)
  os.rename(new, old)
  os.rename(parked / old.name, new)
  parked.rmdir()


def _rename_exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
  """Atomically exchanges ``a`` and ``b`` with Linux ``renameat2``; False if unsupported."""
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = libc.renameat2
  except (OSError, AttributeError):
    return False
  at_fdcwd, rename_exchange = -100, 2
  if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
    return False  # the filesystem or kernel cannot exchange
  raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """Reads and validates an artifact's metadata against this version of the code."""
  path = pathlib.Path(path)
  meta_file = path / METADATA_FILE
  if not meta_file.is_file() or not (path / THETA_DIR).is_dir():
    raise ArtifactError(
        f"{path} is not a metaopt learned-optimizer artifact: expected {METADATA_FILE} "
        f"and {THETA_DIR}/ inside it (write one with metaopt.checkpoint.save).")
  try:
    metadata = json.loads(meta_file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ArtifactError(f"{meta_file} is not valid JSON: {e}") from e
  except RecursionError:
    raise ArtifactError(f"{meta_file} is nested too deeply to be artifact metadata."
                        ) from None
  if not isinstance(metadata, dict):
    raise ArtifactError(f"{meta_file} holds a JSON {type(metadata).__name__}; expected "
                        "an object (write artifacts with metaopt.checkpoint.save).")
  for key, kind in (("features", list), ("candidates", list), ("config", dict),
                    ("theta_shapes", dict), ("info", dict), ("meta_training", dict)):
    if key in metadata and not isinstance(metadata[key], kind):
      raise ArtifactError(f"{meta_file}: {key!r} is a JSON {type(metadata[key]).__name__}"
                          f"; expected a{'n object' if kind is dict else ' list'}.")
  version = metadata.get("format_version")
  if type(version) is not int or version != FORMAT_VERSION:  # pylint: disable=unidiomatic-typecheck
    raise ArtifactError(f"{path}: artifact format_version={version!r}, but this metaopt "
                        f"{__version__} reads format_version={FORMAT_VERSION}.")
  try:
    config = LOConfig.from_dict(metadata["config"])
  except (KeyError, TypeError, ValueError) as e:
    raise ArtifactError(f"{path}: invalid config in {METADATA_FILE}: {e}") from e
  for key, expected in (("features", config.feature_names),
                        ("candidates", config.candidate_names)):
    got = tuple(metadata.get(key, ()))
    if got != tuple(expected):
      missing = [f for f in expected if f not in got]
      extra = [f for f in got if f not in expected]
      raise ArtifactError(
          f"{path}: the artifact's {key} differ from this code's: missing {missing}, "
          f"unexpected {extra}" + ("" if missing or extra else ", different order") +
          f". It was written by metaopt {metadata.get('package_version')!r}.")
  shapes = {k: list(v) for k, v in _network.theta_shapes(config).items()}
  if metadata.get("theta_shapes") != shapes:
    raise ArtifactError(f"{path}: theta_shapes {metadata.get('theta_shapes')} do not match "
                        f"the config's {shapes}.")
  return metadata


def load(path: str | os.PathLike) -> LearnedOptimizer:
  """Loads a learned optimizer written by :func:`save`."""
  path = pathlib.Path(path).absolute()
  metadata = read_metadata(path)
  config = LOConfig.from_dict(metadata["config"])
  target = {k: np.zeros(v, np.float32) for k, v in _network.theta_shapes(config).items()}
  try:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    restored = _checkpointer().restore(
        path / THETA_DIR, args=ocp.args.PyTreeRestore(
            item=target,
            restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                      target)))
  except Exception as e:  # orbax raises many types; report them as one.
    raise ArtifactError(f"{path}: could not restore theta: {type(e).__name__}: {e}") from e
  theta = {}
  for k, shape in _network.theta_shapes(config).items():
    arr = np.asarray(restored.get(k))
    if arr.shape != tuple(shape) or not np.all(np.isfinite(arr)):
      raise ArtifactError(f"{path}: theta[{k!r}] has shape {arr.shape} (expected "
                          f"{tuple(shape)}) or non-finite values.")
    theta[k] = jax.numpy.asarray(arr, np.float32)
  info = dict(metadata.get("info", {}))
  info["meta_training"] = metadata.get("meta_training", {})
  info["path"] = str(path)
  return LearnedOptimizer(config, theta, info)


def available() -> list[str]:
  """Names of the artifacts released inside the package."""
  root = _resources.checkpoints_dir()
  return sorted(p.name for p in root.iterdir() if (p / METADATA_FILE).is_file())


def pretrained(name: str = "default") -> LearnedOptimizer:
  """Loads a released learned optimizer shipped with the package (no network)."""
  root = _resources.checkpoints_dir()
  path = root / name
  if not (path / METADATA_FILE).is_file():
    names = available()
    raise ValueError(f"no released learned optimizer named {name!r} in {root}; "
                     f"available: {names or 'none yet'}. Load your own with "
                     "metaopt.load(path).")
  return load(path)
