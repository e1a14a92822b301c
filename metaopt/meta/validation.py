"""Evaluation of a theta on whole training runs (the meta-objective without truncation).

For ``S`` seeds, the LO trains the task from a fresh init for the full horizon ``T``;
the score is the meta-objective over the whole run,

.. math:: \\bar L = \\frac{1}{S T} \\sum_{s, t} \\min(\\ell_s(t) / \\ell_s(0), B),

plus the final test loss on the task's fixed eval batch. The same seeds and data are used
for every theta, so two thetas' scores compare directly (the warm start's is the
baseline every run logs at step 0).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from metaopt import lopt
from metaopt.meta import population as pop_lib
from metaopt.meta import unroll as unroll_lib
from metaopt.meta.inner import lo_problem


def make_evaluator(lo_config: lopt.LOConfig, task, *, num_steps: int, seeds: int = 4,
                   informed: bool = True, loss_bound: float = 3.0, seed: int = 0,
                   log_loss: bool = False) -> Callable[[dict], dict]:
  """A jitted ``theta -> {"meta_loss", "final_loss", "test_loss"}`` (seed means)."""
  problem = lo_problem(task, lo_config, informed=informed)
  schedule = pop_lib.TruncationSchedule(num_steps, num_steps)
  eval_batch = task.eval_batch()

  def evaluate(theta):
    pop = pop_lib.init_population(problem.init, schedule, jax.random.PRNGKey(seed),
                                  seeds, 1, antithetic=False, stagger=False)

    def run(member):
      member, meta_loss, finite = unroll_lib.truncate(problem, num_steps, loss_bound,
                                                      theta, member, log_loss=log_loss)
      inner = member.inner
      params = jax.tree.map(jnp.multiply, inner.params, inner.scales)
      test = task.metrics(params, eval_batch)["loss"]
      return meta_loss, finite, test

    meta_loss, finite, test = jax.vmap(run)(pop)
    test = jnp.where(finite & jnp.isfinite(test), test, jnp.inf)
    return {"meta_loss": jnp.mean(meta_loss), "test_loss": jnp.mean(test),
            "nonfinite": jnp.sum(~finite)}

  return jax.jit(evaluate)


def selection_entries(suites=("validation",)) -> list:
  """The suite entries checkpoints are selected on: those of every named suite, in
  order (``MetaConfig.selection_suites``; ``user_shaped`` adds ``validation-user``, one
  out-of-support model per user-shaped family)."""
  import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  return [e for name in suites for e in tasks_lib.get_suite(name)]


def score_thetas(lo_config: lopt.LOConfig, thetas: dict[str, dict], entries, *,
                 seeds: int = 2, log_loss: bool = True) -> dict[str, dict[str, float]]:
  """``{task name: {label: meta-objective}}`` of each theta on suite ``entries``.

  Informed runs (``value`` and ``num_steps`` passed) of each entry's full horizon; one
  compilation per task serves every theta. With ``log_loss`` (the default) late progress
  counts: this is how release checkpoints are selected on the ``validation`` suite.
  """
  import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  out = {}
  for entry in entries:
    task = tasks_lib.build(entry.config, entry.num_steps)
    fn = make_evaluator(lo_config, task, num_steps=entry.num_steps, seeds=seeds,
                        informed=True, log_loss=log_loss)
    out[task.name] = {label: float(fn(theta)["meta_loss"]) for label, theta in thetas.items()}
  return out
