"""Subprocess worker for the multi-device meta-training tests (not collected by pytest).

  python tests/meta_worker.py OUT.npz CONFIG.json [--steps N] [--save-ckpt DIR]
      [--resume-from DIR]

Runs N outer steps from a fresh state on every visible device (set
``XLA_FLAGS=--xla_force_host_platform_device_count=D`` for D fake CPU devices) and
writes, per outer step s and task i, the meta-gradient ``grad_s_i`` and meta-loss
``loss_s_i`` and the flat theta after the step ``theta_s``; ``--save-ckpt`` checkpoints
the state after the first step. ``--resume-from`` then restores the newest checkpoint of
DIR (possibly saved on another device count) on the current devices
(``resumed_restored_theta``, ``resumed_restored_step``) and runs the remaining N - 1
steps from it (``resumed_grad_s_i``, ...).
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from metaopt.meta import MetaConfig, MetaTrainer, checkpointing


def run_steps(trainer: MetaTrainer, state, n: int, record: dict, prefix: str = ""):
  for _ in range(n):
    step = int(state.step)
    for i in trainer.active_tasks(step):
      sub = {g.name: state.populations[g.name] for g in trainer.groups[i]}
      # A task's program returns (loss, gradient, populations, metrics, restarts).
      loss, grad = trainer.program(i)(state.theta, sub, state.key, state.step)[:2]
      record[f"{prefix}grad_{step}_{i}"] = np.asarray(grad)
      record[f"{prefix}loss_{step}_{i}"] = np.asarray(loss)
    state, _ = trainer.step(state)
    record[f"{prefix}theta_{step}"] = np.asarray(ravel_pytree(state.theta)[0])
  return state


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("out")
  parser.add_argument("config")
  parser.add_argument("--steps", type=int, default=1)
  parser.add_argument("--save-ckpt", default=None)
  parser.add_argument("--resume-from", default=None)
  args = parser.parse_args()
  with open(args.config) as f:
    config = MetaConfig.from_dict(json.load(f))
  trainer = MetaTrainer(config)
  meta = checkpointing.run_metadata(config, trainer.lo_config,
                                    [t.name for t in trainer.tasks])
  record = {"devices": np.asarray(jax.device_count())}
  state = run_steps(trainer, trainer.init(), 1, record)
  if args.save_ckpt:
    manager = checkpointing.checkpoint_manager(args.save_ckpt)
    checkpointing.save(manager, int(state.step), state, meta)
    manager.wait_until_finished()
  run_steps(trainer, state, args.steps - 1, record)
  if args.resume_from:
    manager = checkpointing.checkpoint_manager(args.resume_from)
    state = checkpointing.restore(manager, manager.latest_step(), trainer.abstract_state(),
                                  meta)
    record["resumed_restored_theta"] = np.asarray(ravel_pytree(state.theta)[0])
    record["resumed_restored_step"] = np.asarray(state.step)
    run_steps(trainer, state, args.steps - int(state.step), record, "resumed_")
  np.savez(args.out, **record)


if __name__ == "__main__":
  main()
