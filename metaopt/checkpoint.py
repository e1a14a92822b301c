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

import json
import os
import pathlib
import tempfile
from typing import Any

import jax
import numpy as np

from metaopt import _resources
from metaopt._version import __version__
from metaopt.lopt import _network
from metaopt.lopt._config import CANDIDATE_NAMES, FEATURE_NAMES, LOConfig
from metaopt.lopt._learned import LearnedOptimizer

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
THETA_DIR = "theta"
MODEL_CARD_FILE = "MODEL_CARD.md"


class ArtifactError(ValueError):
  """The directory is not a (compatible) learned-optimizer artifact."""


def _checkpointer():
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp.PyTreeCheckpointer()


def save(lo: LearnedOptimizer, path: str | os.PathLike, *,
         meta_training: dict[str, Any] | None = None, overwrite: bool = False
         ) -> pathlib.Path:
  """Writes ``lo`` to the directory ``path`` (created; must not exist unless overwrite).

  The arrays are written by orbax into a temporary sibling directory which is renamed
  into place only once complete, so a crash never leaves a half-written artifact.
  Overwriting keeps an existing ``MODEL_CARD.md``.
  """
  path = pathlib.Path(path).absolute()
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
  theta = jax.tree.map(lambda a: np.asarray(jax.device_get(a), np.float32), lo.theta)
  metadata = {
      "format_version": FORMAT_VERSION,
      "package": "metaopt",
      "package_version": __version__,
      "kind": "metaopt.LearnedOptimizer",
      "config": lo.config.to_dict(),
      "features": list(FEATURE_NAMES),
      "candidates": list(CANDIDATE_NAMES),
      "theta_shapes": {k: list(v) for k, v in _network.theta_shapes(lo.config).items()},
      "meta_training": meta_training if meta_training is not None else
                       lo.metadata.get("meta_training", {}),
      "info": {k: v for k, v in lo.metadata.items() if k != "meta_training"},
  }
  json.dumps(metadata)  # fail before writing anything if it is not JSON-able
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
  try:
    _checkpointer().save(tmp / THETA_DIR, theta)
    (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))
    if path.exists():
      import shutil  # pylint: disable=g-import-not-at-top
      card = path / MODEL_CARD_FILE
      if card.is_file():  # the card documents the artifact; re-saving must not lose it
        shutil.copy2(card, tmp / MODEL_CARD_FILE)
      shutil.rmtree(path)
    os.replace(tmp, path)
  except BaseException:
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return path


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
  except json.JSONDecodeError as e:
    raise ArtifactError(f"{meta_file} is not valid JSON: {e}") from e
  version = metadata.get("format_version")
  if version != FORMAT_VERSION:
    raise ArtifactError(f"{path}: artifact format_version={version!r}, but this metaopt "
                        f"{__version__} reads format_version={FORMAT_VERSION}.")
  for key, expected in (("features", FEATURE_NAMES), ("candidates", CANDIDATE_NAMES)):
    got = tuple(metadata.get(key, ()))
    if got != tuple(expected):
      missing = [f for f in expected if f not in got]
      extra = [f for f in got if f not in expected]
      raise ArtifactError(
          f"{path}: the artifact's {key} differ from this code's: missing {missing}, "
          f"unexpected {extra}" + ("" if missing or extra else ", different order") +
          f". It was written by metaopt {metadata.get('package_version')!r}.")
  try:
    config = LOConfig.from_dict(metadata["config"])
  except (KeyError, TypeError, ValueError) as e:
    raise ArtifactError(f"{path}: invalid config in {METADATA_FILE}: {e}") from e
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
