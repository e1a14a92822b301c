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
import re
import secrets
import shutil
import sys
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
  """The directory is not a (compatible) learned-optimizer artifact, or the learned
  optimizer given to :func:`save` would not make one."""


class ArtifactWriteError(OSError):
  """:func:`save` could not write the artifact (disk full, permissions, ...).

  An ``OSError`` whose ``errno`` is the underlying one (``errno.ENOSPC`` when the disk
  is full) and whose message is one line naming the path; whatever was at the path
  before is unchanged.
  """


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

  Before anything is written, ``lo`` gets the checks :func:`load` makes (metadata,
  theta entries and shapes against the config, finite float32 values): what it would
  refuse raises :class:`ArtifactError`. A failed write (disk full, no permission)
  raises :class:`ArtifactWriteError`, an ``OSError`` with the underlying ``errno``.
  The artifact gets the permissions the umask gives (0755 directories and 0644 files
  under umask 022), so others on a shared machine can load it.
  """
  path = pathlib.Path(path).absolute()
  if path.exists() or path.is_symlink():
    if not overwrite:
      raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
    _check_replaceable(path)
  with np.errstate(over="ignore"):  # values beyond float32 are reported below
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
  # Before writing anything, the checks load makes, on what load would read back.
  try:
    metadata_text = json.dumps(metadata, indent=2, sort_keys=True)
  except (TypeError, ValueError) as e:
    raise ArtifactError(f"refusing to save {path}: its metadata is not JSON: {e}"
                        ) from None
  try:
    _check_metadata(json.loads(metadata_text), path)
  except ArtifactError as e:
    raise ArtifactError(f"refusing to save, metaopt.load would refuse it: {e}") from None
  problem = _theta_problem(theta, lo.config)
  if problem:
    raise ArtifactError(f"refusing to save {path}: {problem}; metaopt.load would refuse "
                        "the artifact.")
  if checkpointer is None:
    checkpointer = _checkpointer()
  tmp = None
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_sibling_dir(path, "new")
    checkpointer.save(tmp / THETA_DIR, theta)
    _write_metadata(tmp, metadata_text)
    if not path.exists():
      os.rename(tmp, path)
      return path
    card = path / MODEL_CARD_FILE
    if card.is_file():  # the card documents the artifact; re-saving must not lose it
      shutil.copy2(card, tmp / MODEL_CARD_FILE)
    _check_replaceable(path)  # again: it may have changed while theta was written
    _swap(tmp, path)  # from here on tmp holds the old artifact
  except BaseException as e:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
    code = _os_error_code(e)
    if code is None:
      raise
    raise ArtifactWriteError(
        code, f"cannot save the artifact {path}: {os.strerror(code)} "
        f"[{errno.errorcode.get(code, code)}] ({type(e).__name__} while writing; "
        f"{'the old artifact is unchanged' if path.exists() else 'nothing was written'})."
    ) from e
  shutil.rmtree(tmp, ignore_errors=True)
  return path


def _write_metadata(directory: pathlib.Path, text: str) -> None:
  (directory / METADATA_FILE).write_text(text)


def _os_error_code(e: BaseException) -> int | None:
  """The errno of a failed write: an ``OSError``'s, or the one tensorstore (orbax's
  writer) puts in its ``ValueError`` message; None for other errors and for the
  ``FileExistsError`` that :func:`_check_replaceable` raises."""
  if isinstance(e, OSError) and not isinstance(e, FileExistsError):
    return e.errno if e.errno else errno.EIO
  if isinstance(e, ValueError):
    match = re.search(r"os_error_code='(\d+)'", str(e))
    if match:
      return int(match.group(1))
  return None


def _make_sibling_dir(path: pathlib.Path, tag: str) -> pathlib.Path:
  """Creates an empty hidden directory beside ``path`` with the umask's permissions.

  Not ``tempfile.mkdtemp``: its directories are mode 0700, and the new one becomes the
  artifact, which other users of a shared machine must be able to read.
  """
  for _ in range(100):
    candidate = path.parent / f".{path.name}.{tag}-{secrets.token_hex(4)}"
    try:
      candidate.mkdir()  # mode 0o777 & ~umask
    except FileExistsError:
      continue
    return candidate
  raise FileExistsError(f"could not create a fresh .{path.name}.{tag}-* directory in "
                        f"{path.parent}")


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
  parked = _make_sibling_dir(old, "old")
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
  _check_metadata(metadata, path)
  return metadata


def _check_metadata(metadata: Any, path: pathlib.Path) -> None:
  """Raises ArtifactError unless ``metadata`` is what this code reads (load and save)."""
  meta_file = path / METADATA_FILE
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


def _theta_problem(theta: Any, config: LOConfig) -> str | None:
  """What makes ``theta`` (host arrays) not a theta of ``config`` that load accepts."""
  shapes = _network.theta_shapes(config)
  if not isinstance(theta, dict) or set(theta) != set(shapes):
    got = sorted(theta) if isinstance(theta, dict) else type(theta).__name__
    return f"theta has entries {got}; the config's are {sorted(shapes)}"
  for k, shape in shapes.items():
    arr = theta[k]
    if not isinstance(arr, np.ndarray) or arr.shape != tuple(shape):
      return (f"theta[{k!r}] has shape {getattr(arr, 'shape', type(arr).__name__)}; the "
              f"config's is {tuple(shape)}")
    bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
    if bad:
      return (f"theta[{k!r}] has {bad} non-finite value(s) (NaN or beyond float32's "
              "range)")
  return None


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
  arrays = {k: np.asarray(restored.get(k)) for k in target}
  problem = _theta_problem(arrays, config)
  if problem:
    raise ArtifactError(f"{path}: {problem}.")
  theta = {k: jax.numpy.asarray(a, np.float32) for k, a in arrays.items()}
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
