"""Meta-training start-up: seconds from nothing to the first outer step, per phase.

Usage (from the repository root, no install needed)::

  python benchmarks/meta_startup.py [--preset default] [--set FIELD=VALUE ...]
      [--no-validation] [--skip-step]

Phases, in the order ``meta_train.py`` runs them:

* build: ``MetaTrainer(config)`` -- resolve and build the tasks, the warm start.
* init: ``trainer.init()`` -- every population's initial state (traced, compiled, run).
* trace: lower every task's step program, the update and (unless ``--no-validation``)
  the validation programs (``trainer.lower_programs`` + the validator's).
* compile: ``outer.compile_all`` of those lowered programs (in threads).
* first step: ``trainer.step`` once, blocked on its result.

``--redraw`` then times the first redraw of the family pools (``MetaTrainer.prepare``
of the state moved to the next window: the configs drawn there for the first time are
compiled and started; not counted in the total).

``--reference-init`` then times, in the same process, the init as it was before
metaopt 0.3: one jitted program holding every population's ``init_population``
(``MetaTrainer._init_state``), so old and new are measured under the same load.

Prints a Markdown table and the 1-minute load average before and after (``os.getloadavg``):
on a shared machine the numbers move with the load, so compare runs side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import platform
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from metaopt.meta import config as config_lib  # pylint: disable=wrong-import-position
from metaopt.meta import outer  # pylint: disable=wrong-import-position
from metaopt.meta import run as run_lib  # pylint: disable=wrong-import-position
from metaopt.meta import sharding as shard_lib  # pylint: disable=wrong-import-position


def _timed(fn):
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start


class _Phases(dict):
  """Seconds per phase; each one is also printed to stderr as it ends, so a run cut
  short by a timeout still tells how far it got."""

  def __setitem__(self, phase: str, seconds: float) -> None:
    super().__setitem__(phase, seconds)
    print(f"[meta_startup] {phase}: {seconds:.1f} s (load {os.getloadavg()[0]:.1f})",
          file=sys.stderr, flush=True)


def measure(config: config_lib.MetaConfig, *, validation: bool = True,
            step: bool = True, reference_init: bool = False,
            redraw: bool = False) -> dict:
  """Seconds per phase (and a few counts) of one start-up with ``config``."""
  seconds, counts = _Phases(), {}
  trainer, seconds["build"] = _timed(lambda: outer.MetaTrainer(config))
  state, seconds["init"] = _timed(trainer.init)
  validate = run_lib._Validator(trainer) if (  # pylint: disable=protected-access
      validation and config.validation_every) else None

  def lower():
    lowered = trainer.lower_programs(state)
    return lowered + (validate.lower(state.theta) if validate else [])

  lowered, seconds["trace"] = _timed(lower)
  seconds["compile"] = outer.compile_all(lowered)
  if step:
    _, seconds["first step"] = _timed(lambda: trainer.step(state)[0])
  if redraw and trainer.pools:
    window = outer.family_window(config)
    later = state._replace(step=shard_lib.global_array(np.int32(window), trainer._rep))  # pylint: disable=protected-access
    counts["drawn at the redraw"] = len(set(trainer.active_tasks(window))
                                        - set(trainer.active_tasks(0)))
    _, seconds["redraw (prepare)"] = _timed(lambda: trainer.prepare(later)[0])
  if reference_init:
    reference = jax.jit(trainer._init_state,  # pylint: disable=protected-access
                        out_shardings=trainer.shardings())
    _, seconds["init (one program, before)"] = _timed(reference)
  counts["tasks"] = len(trainer.tasks)
  counts["populations"] = len(state.populations)
  counts["programs"] = len(lowered)
  counts["init programs"] = getattr(trainer, "init_programs", lambda: None)()
  return {"seconds": dict(seconds), "counts": counts}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="default", help="a PRESETS name or JSON file")
  parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                      help="MetaConfig overrides, as meta_train.py --set")
  parser.add_argument("--no-validation", action="store_true",
                      help="leave the validation programs out of trace and compile")
  parser.add_argument("--skip-step", action="store_true", help="stop after compile")
  parser.add_argument("--redraw", action="store_true",
                      help="also time the first redraw of the family pools: "
                           "MetaTrainer.prepare of the state moved to the next window")
  parser.add_argument("--reference-init", action="store_true",
                      help="also time the one-program init of before (same process)")
  args = parser.parse_args()
  config = config_lib.load_config(args.preset)
  if args.set:
    config = dataclasses.replace(config, **config_lib.parse_overrides(args.set))
  load_before = os.getloadavg()[0]
  r = measure(config, validation=not args.no_validation, step=not args.skip_step,
              reference_init=args.reference_init, redraw=args.redraw)
  load_after = os.getloadavg()[0]
  s = r["seconds"]
  print(f"# Meta-training start-up: preset {args.preset} {' '.join(args.set)}\n")
  print(f"{platform.machine()}, {jax.devices()[0].platform} x{jax.device_count()}, "
        f"{os.cpu_count()} cores, jax {jax.__version__}; load (1 min) "
        f"{load_before:.1f} -> {load_after:.1f}")
  print(", ".join(f"{k} {v}" for k, v in r["counts"].items() if v is not None) + "\n")
  phases = [k for k in s if "before" not in k and "redraw" not in k]
  print("| " + " | ".join(s) + " | total |")
  print("|" + "---|" * (len(s) + 1))
  print("| " + " | ".join(f"{v:.1f}" for v in s.values())
        + f" | {sum(s[k] for k in phases):.1f} |", flush=True)


if __name__ == "__main__":
  main()
