"""Training runs: one jitted ``lax.scan`` per (task, optimizer), vmapped over settings.

Every (schedule, learning rate, seed) point of one optimizer on one task has the same
shapes, so the points run as a single ``jax.vmap`` batch: the learning rate, the schedule
index and the seed are traced arguments. Seed ``s`` fixes the initialization and the data
order (``jax.random.key(s)`` split into init and data keys), the same for every optimizer.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt.eval import baselines
from metaopt.eval import sweep
from tasks import training


@dataclasses.dataclass(frozen=True)
class RunPoint:
  """One training run of an optimizer on a task."""

  schedule: str
  lr: float
  seed: int


@dataclasses.dataclass(frozen=True)
class RunOutput:
  """What a run produced.

  Attributes:
    point: the run's settings.
    losses: per-step training loss, shape ``(num_steps,)``: the batch loss before each
      update, at the optimizer's evaluation point (Schedule-Free: the average ``x``).
    test: metrics of the final (evaluation) parameters on the task's eval batch.
    seconds_per_step: wall time of the batch / (steps * runs in the batch).
  """

  point: RunPoint
  losses: np.ndarray
  test: dict[str, float]
  seconds_per_step: float


def _learning_rate(lr: jax.Array, schedule_index: jax.Array, shapes: Sequence[Any],
                   scalar: bool):
  """A traced scalar (constant-only or scalar-only optimizers) or a schedule."""
  if scalar or len(shapes) == 1 and shapes[0] is None:
    return lr
  return lambda count: lr * jnp.stack([s(count) for s in shapes])[schedule_index]


def train_fn(task: Any, spec: baselines.OptimizerSpec, schedules: Sequence[str],
             warmup_fraction: float = 0.05):
  """``(lr, schedule_index, seed) -> (losses, test_metrics)`` for one run (vmappable)."""
  num_steps = task.num_steps
  constant_only = tuple(schedules) == ("constant",)
  shapes = [None] if constant_only else [
      sweep.schedule_shape(s, num_steps, warmup_fraction) for s in schedules]

  def run(lr, schedule_index, seed):
    learning_rate = _learning_rate(lr, schedule_index, shapes, spec.scalar_lr or
                                   constant_only)
    opt = optax.with_extra_args_support(spec.make(learning_rate, task))
    init_key, data_key = jax.random.split(jax.random.key(seed))
    params = task.init(init_key)
    step = training.train_step(task, opt)

    def body(carry, key):
      params, opt_state = carry
      if spec.eval_params is not None:  # the batch's loss at the evaluation point
        eval_loss = task.loss(spec.eval_params(opt_state, params), task.sample_batch(key))
      params, opt_state, loss = step(params, opt_state, key)
      return (params, opt_state), loss if spec.eval_params is None else eval_loss

    (params, opt_state), losses = jax.lax.scan(
        body, (params, opt.init(params)), jax.random.split(data_key, num_steps))
    if spec.eval_params is not None:
      params = spec.eval_params(opt_state, params)
    return losses, task.metrics(params, task.eval_batch())

  return run


def _args(points: Sequence[RunPoint], schedules: Sequence[str]):
  return (jnp.asarray([p.lr for p in points], jnp.float32),
          jnp.asarray([schedules.index(p.schedule) for p in points], jnp.int32),
          jnp.asarray([p.seed for p in points], jnp.uint32))


def compile_batch(task: Any, spec: baselines.OptimizerSpec, schedules: Sequence[str],
                  batch: int, warmup_fraction: float = 0.05):
  """The compiled vmapped run function for ``batch`` points (shapes only)."""
  fn = jax.jit(jax.vmap(train_fn(task, spec, schedules, warmup_fraction)))
  return fn.lower(*_args([RunPoint(schedules[0], 1.0, 0)] * batch, schedules)).compile()


class Compiler:
  """Compiles run functions, optionally ahead of time on a background thread.

  :meth:`prefetch` starts compiling a batch shape that will be needed; :meth:`get`
  returns it (waiting, or compiling now if it was never requested). Compiling the next
  job while the current one runs hides most compile time on a multi-core CPU. Compiled
  functions are kept for the process (keyed by the task's config and the optimizer's
  fingerprint), so evaluating again in the same process reuses them.
  """

  _done: collections.OrderedDict = collections.OrderedDict()  # shared, bounded
  MAX_KEPT = 64

  def __init__(self, background: bool = True):
    self._pool = concurrent.futures.ThreadPoolExecutor(1) if background else None
    self._futures = {}

  @staticmethod
  def _key(task, spec, schedules, batch, warmup_fraction):
    return (task.name, repr(task.config), task.num_steps, spec.label, spec.fingerprint,
            tuple(schedules), batch, warmup_fraction)

  def prefetch(self, task, spec, schedules, batch, warmup_fraction=0.05) -> None:
    key = self._key(task, spec, schedules, batch, warmup_fraction)
    if self._pool is not None and key not in self._futures and key not in self._done:
      self._futures[key] = self._pool.submit(compile_batch, task, spec, tuple(schedules),
                                             batch, warmup_fraction)

  def get(self, task, spec, schedules, batch, warmup_fraction=0.05):
    """``(compiled, seconds waited for it)``."""
    t0 = time.perf_counter()
    key = self._key(task, spec, schedules, batch, warmup_fraction)
    future = self._futures.pop(key, None)
    if future is not None:
      compiled = future.result()
    elif key in self._done:
      compiled = self._done[key]
    else:
      compiled = compile_batch(task, spec, tuple(schedules), batch, warmup_fraction)
    if spec.fingerprint:
      self._done[key] = compiled
      self._done.move_to_end(key)
      while len(self._done) > self.MAX_KEPT:
        self._done.popitem(last=False)
    return compiled, time.perf_counter() - t0

  def close(self) -> None:
    if self._pool is not None:
      self._pool.shutdown(wait=False, cancel_futures=True)


def batch_sizes(num_points: int, max_batch: int | None) -> list[int]:
  """Sizes of the vmapped batches ``num_points`` points are split into."""
  if num_points <= 0:
    return []
  size = num_points if not max_batch else min(max_batch, num_points)
  return [min(size, num_points - start) for start in range(0, num_points, size)]


def run_points(task: Any, spec: baselines.OptimizerSpec, points: Sequence[RunPoint], *,
               schedules: Sequence[str] | None = None, warmup_fraction: float = 0.05,
               max_batch: int | None = None, compiler: Compiler | None = None,
               pad_to: int | None = None) -> tuple[list[RunOutput], float]:
  """Runs ``points`` of ``spec`` on ``task`` in vmapped batches of at most ``max_batch``.

  Args:
    schedules: the schedules the compiled function selects among (default: those of
      ``points``); pass ``spec.schedules`` to share compilations across calls.
    pad_to: pad the points (with copies of the first, discarded) to this many, so a
      resumed job reuses the compilation of the full batch (e.g. from JAX's persistent
      compilation cache) instead of compiling a new shape.

  Returns:
    ``(outputs in the order of points, seconds spent compiling or waiting for it)``.
  """
  schedules = tuple(schedules or dict.fromkeys(p.schedule for p in points))
  compiler = compiler or Compiler(background=False)
  num_real = len(points)
  points = list(points) + [points[0]] * max(0, (pad_to or 0) - num_real)
  outputs, compile_s, start = [], 0.0, 0
  for size in batch_sizes(len(points), max_batch):
    chunk = points[start:start + size]
    start += size
    compiled, waited = compiler.get(task, spec, schedules, size, warmup_fraction)
    compile_s += waited
    t0 = time.perf_counter()
    losses, test = jax.block_until_ready(compiled(*_args(chunk, schedules)))
    seconds = (time.perf_counter() - t0) / (task.num_steps * size)
    losses, test = np.asarray(losses), jax.tree.map(np.asarray, test)
    for i, p in enumerate(chunk):
      outputs.append(RunOutput(p, losses[i], {k: float(v[i]) for k, v in test.items()},
                               seconds))
  return outputs[:num_real], compile_s
