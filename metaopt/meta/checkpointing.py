"""Resumable meta-training: orbax ``CheckpointManager`` over the whole :class:`MetaState`.

Every checkpoint ``<dir>/<step>/`` holds two items, written atomically by orbax (a
temporary directory renamed into place on completion, so a run killed mid-save leaves
the previous checkpoints intact; the last ``keep`` are kept):

* ``state``: theta, the outer optimizer state, every population (inner parameters and
  LO states, step counters, horizons, normalizers, PES accumulators, episode keys), the
  base PRNG key and the step -- global arrays, each host writing its own shards;
* ``config``: the :class:`~metaopt.meta.config.MetaConfig`, the LO config and the task
  names as JSON, and ``"populations"``: whether ``state`` holds them.

A *light* checkpoint (``MetaConfig.checkpoint_populations = false``) holds theta, the
outer optimizer state, the key and the step only: kilobytes to a few MiB instead of every
inner run, so it travels (off a leased GPU, to a CPU). Restoring it starts fresh
staggered episodes (``init_populations``). Saving a step that is already on disk is a
no-op (a stop right after a periodic checkpoint saves the same step again).

Restoring reads into an abstract target tree (``jax.ShapeDtypeStruct`` with the current
run's shardings), so a run saved on 4 devices resumes on 1 (an accelerator run continues
on a CPU). The saved config and array shapes are checked against the current run first:
a mismatch raises :class:`CheckpointError` naming it, an unreadable or incomplete
checkpoint its subclass :class:`CorruptCheckpointError` (``--resume`` then falls back to
the newest intact one, :func:`restore_newest`).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable

import jax

from metaopt.meta.config import MetaConfig

FORMAT_VERSION = 1
# Fields that may change when a run is resumed (they do not change the computation).
RESUMABLE_FIELDS = ("outer_steps", "validation_every", "validation_seeds",
                    "checkpoint_every", "keep_checkpoints", "log_every", "selection_suites",
                    "checkpoint_populations")
# What a light checkpoint keeps of a MetaState.
LIGHT_FIELDS = ("theta", "opt_state", "key", "step")


class CheckpointError(RuntimeError):
  """A meta-training checkpoint is missing, unreadable or from a different run."""


class CorruptCheckpointError(CheckpointError):
  """A checkpoint's files are unreadable or incomplete (not a different run's)."""


def _ocp():
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp


def checkpoint_manager(directory: str | pathlib.Path, *, keep: int = 3):
  """An orbax ``CheckpointManager`` keeping the last ``keep`` checkpoints."""
  ocp = _ocp()
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(
      pathlib.Path(directory).absolute(), options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "config": ocp.JsonCheckpointHandler()})


def run_metadata(config: MetaConfig, lo_config, task_names) -> dict[str, Any]:
  return {"format_version": FORMAT_VERSION, "config": config.to_dict(),
          "lo_config": lo_config.to_dict(), "tasks": list(task_names),
          "process_count": jax.process_count(), "device_count": jax.device_count()}


def light_state(state) -> dict[str, Any]:
  """What a light checkpoint holds of a ``MetaState``: no populations."""
  return {name: getattr(state, name) for name in LIGHT_FIELDS}


def save(manager, step: int, state, metadata: dict[str, Any], *,
         populations: bool = True) -> bool:
  """Saves ``state`` at ``step`` (asynchronously; ``manager.wait_until_finished()``),
  without the populations unless ``populations``. A step already saved is left as it
  is (returns False)."""
  ocp = _ocp()
  if step in manager.all_steps():
    return False
  tree = state if populations else light_state(state)
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(tree),
      config=ocp.args.JsonSave({**metadata, "populations": populations})), force=True)
  return True


class RunCheckpoints:
  """A run's checkpoints as the outer loop writes them: the manager, the metadata
  saved with every step, light or not."""

  def __init__(self, manager, metadata: dict[str, Any], *, populations: bool = True):
    self.manager, self.metadata, self.populations = manager, metadata, populations

  def save(self, step: int, state) -> bool:
    return save(self.manager, step, state, self.metadata, populations=self.populations)

  def wait(self) -> None:
    self.manager.wait_until_finished()


def read_metadata(manager, step: int) -> dict[str, Any]:
  ocp = _ocp()
  try:
    return manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"]
  except Exception as e:  # orbax raises many types; report them as one.
    raise CorruptCheckpointError(
        f"checkpoint step {step} in {manager.directory} is unreadable ({type(e).__name__}:"
        f" {e}); delete that step's directory to resume from an earlier one.") from e


def check_metadata(saved: dict[str, Any], expected: dict[str, Any], where: str) -> None:
  """Raises :class:`CheckpointError` when the checkpoint is from a different run."""
  if saved.get("format_version") != FORMAT_VERSION:
    raise CheckpointError(f"{where}: checkpoint format_version="
                          f"{saved.get('format_version')!r}; this code reads "
                          f"{FORMAT_VERSION}.")
  diffs = []
  defaults = MetaConfig().to_dict()  # fields added since a checkpoint kept their default
  for key in ("config", "lo_config"):
    a, b = saved.get(key, {}), expected[key]
    if key == "config":
      a = {**{f: v for f, v in defaults.items() if f not in a}, **a}
    for field in sorted(set(a) | set(b)):
      if key == "config" and field in RESUMABLE_FIELDS:
        continue
      if a.get(field) != b.get(field):
        diffs.append(f"{key}.{field}: checkpoint {a.get(field)!r} != run {b.get(field)!r}")
  if saved.get("tasks") != expected["tasks"]:
    diffs.append(f"tasks: checkpoint {saved.get('tasks')} != run {expected['tasks']}")
  if diffs:
    raise CheckpointError(f"{where} was written by a different meta-training run:\n  " +
                          "\n  ".join(diffs))


def _leaf_name(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return ".".join(parts)


def check_shapes(manager, step: int, abstract_state, where: str) -> None:
  """Compares the saved arrays' shapes and dtypes with the target's, by name."""
  try:
    metadata = manager.item_metadata(step)["state"]
    saved = {m.name: (tuple(m.shape), str(m.dtype)) for m in jax.tree.leaves(metadata)}
    if not saved:
      raise ValueError("no arrays")
  except Exception as e:  # pylint: disable=broad-except
    raise CorruptCheckpointError(f"{where}: cannot read the array metadata ({type(e).__name__}: "
                          f"{e}); the checkpoint is corrupt or incomplete.") from e
  target = {_leaf_name(p): (tuple(s.shape), str(s.dtype))
            for p, s in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
  missing = sorted(set(target) - set(saved))
  extra = sorted(set(saved) - set(target))
  wrong = [f"{k}: checkpoint {saved[k]} != run {target[k]}"
           for k in sorted(set(saved) & set(target)) if saved[k] != target[k]]
  if missing or extra or wrong:
    raise CheckpointError(
        f"{where} does not match this run's state: missing {missing[:5]}, unexpected "
        f"{extra[:5]}, different shape/dtype {wrong[:5]}.")


def restore_theta(manager, step: int) -> dict[str, Any]:
  """Only theta of checkpoint ``step`` (host arrays), readable without the run's trainer:
  what exporting or scoring a checkpoint needs."""
  ocp = _ocp()
  try:
    # Onto this process's first device, whatever the saving run's devices were (a
    # 2-device CPU run, a GPU lease): without a target orbax keeps the saved topology.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype,
                                                         sharding=device),
                          manager.item_metadata(step)["state"])
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))
  except Exception as e:  # orbax raises many types; report them as one.
    raise CheckpointError(f"checkpoint {manager.directory}/{step}: could not restore "
                          f"theta ({type(e).__name__}: {e}).") from e
  return dict(restored["state"]["theta"])


def restore(manager, step: int, abstract_state, expected_metadata: dict[str, Any], *,
            init_populations: Callable[[], dict] | None = None):
  """The state saved at ``step``, placed with ``abstract_state``'s shardings. A light
  checkpoint gets its populations from ``init_populations()`` (fresh episodes)."""
  ocp = _ocp()
  where = f"checkpoint {manager.directory}/{step}"
  saved = read_metadata(manager, step)
  check_metadata(saved, expected_metadata, where)
  light = saved.get("populations", True) is False
  target = light_state(abstract_state) if light else abstract_state
  check_shapes(manager, step, target, where)
  if light and init_populations is None:
    raise CheckpointError(f"{where} is a light checkpoint (no populations) and no "
                          "init_populations was given to start fresh episodes.")
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))
  except Exception as e:  # orbax raises many types; report them as one.
    raise CorruptCheckpointError(f"{where}: could not restore the state ({type(e).__name__}: "
                                 f"{e}); the checkpoint is corrupt or incomplete.") from e
  if not light:
    return restored["state"]
  return type(abstract_state)(populations=init_populations(), **restored["state"])


def restore_newest(manager, abstract_state, expected_metadata: dict[str, Any], *,
                   init_populations: Callable[[], dict] | None = None,
                   fallback: bool = True) -> tuple[Any, int, list[tuple[int, str]]]:
  """The newest intact checkpoint: ``(state, step, skipped)``, ``skipped`` the newer
  steps that were corrupt or incomplete, newest first, each with its error.

  Raises:
    CorruptCheckpointError: the newest is corrupt and not ``fallback``, or none is
      intact.
    CheckpointError: a checkpoint is from a different run (never skipped).
  """
  skipped = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state = restore(manager, step, abstract_state, expected_metadata,
                      init_populations=init_populations)
    except CorruptCheckpointError as e:
      if not fallback:
        raise
      skipped.append((step, " ".join(str(e).split())))
      continue
    return state, step, skipped
  raise CorruptCheckpointError(
      f"no intact checkpoint in {manager.directory}: " +
      "; ".join(f"step {s}: {e}" for s, e in skipped))


def config_from_checkpoint(directory: str | pathlib.Path) -> MetaConfig | None:
  """The :class:`MetaConfig` of the newest checkpoint under ``directory`` whose config
  is readable (or None when there is no checkpoint)."""
  manager = checkpoint_manager(directory)
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None
  for step in steps:
    try:
      saved = read_metadata(manager, step)
      break
    except CorruptCheckpointError:
      if step == steps[-1]:
        raise
  try:
    return MetaConfig.from_dict(saved["config"])
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f"{directory}/{step}: invalid config in the checkpoint: {e}"
                          ) from e


def fields_differ(a: MetaConfig, b: MetaConfig) -> list[str]:
  """Fields of two configs that differ, other than :data:`RESUMABLE_FIELDS`."""
  return [f.name for f in dataclasses.fields(MetaConfig)
          if f.name not in RESUMABLE_FIELDS and getattr(a, f.name) != getattr(b, f.name)]
