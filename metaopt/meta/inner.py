"""What a population member trains: an inner problem, pure ``init`` and ``step``.

:class:`InnerProblem` is the interface the unrolls and estimators see; the learned
optimizer training a :class:`tasks.Task` is one (:func:`lo_problem`), a toy problem with
a hand-written inner optimizer is another (the estimator tests use one).

Task augmentation (as in Celo/Celo2: Moudgil et al, "Celo2: Towards Learned Optimization
Free Lunch", arXiv:2602.19142, 2026): each tensor is reparametrized as ``p = s * w``
with a per-episode scale ``s = 10^U(-a, a)``; the optimizer sees ``w`` and its gradient
``s * dL/dp``, so the best step size varies by orders of magnitude across the population.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metaopt import lopt
from metaopt import mup

Theta = dict


@dataclasses.dataclass(frozen=True, eq=False)
class InnerProblem:
  """One member's inner training run as pure functions.

  Attributes:
    init: ``key -> inner_state``.
    step: ``(theta, inner_state, key, t, horizon) -> (inner_state, loss)``: one inner
      step at 0-based step ``t`` of an episode of ``horizon`` steps (int32 arrays), on
      data drawn from ``key``; ``loss`` is the training loss before the step.
    name: for logs.
  """

  init: Callable[[jax.Array], Any]
  step: Callable[..., tuple[Any, jax.Array]]
  name: str = "inner"


class LOInnerState(NamedTuple):
  """A task's parameters (in the optimizer's coordinates), LO state and reparam scales."""

  params: Any
  opt_state: lopt.LOState
  scales: Any


def sample_scales(key: jax.Array, params: Any, augment_scale: float) -> Any:
  """Per-tensor scales ``10^U(-a, a)`` (all ones when ``a == 0``)."""
  leaves, treedef = jax.tree.flatten(params)
  if not augment_scale:
    return jax.tree.unflatten(treedef, [jnp.ones([], jnp.float32) for _ in leaves])
  u = jax.random.uniform(key, (len(leaves),), jnp.float32, -augment_scale, augment_scale)
  return jax.tree.unflatten(treedef, list(10.0**u))


def lo_problem(task, lo_config: lopt.LOConfig, *, informed: bool = True,
               augment_scale: float = 0.0, name: str | None = None) -> InnerProblem:
  """The learned optimizer training ``task`` (theta is the LO's theta dict).

  Args:
    task: a :class:`tasks.Task`.
    lo_config: the LO's static config.
    informed: pass ``value=loss`` and ``num_steps=horizon`` to the LO (else neither).
    augment_scale: a of the per-tensor reparametrization (0: off).
    name: for logs (default: the task's name and ``informed``/``blind``).
  """
  update_scales = mup.update_scales(task.roles) if lo_config.mup else jax.tree.map(
      lambda _: 1.0, task.param_shapes())
  muon_fan_in = lopt.muon_fan_ins(lo_config, task.param_shapes(), task.roles)

  def init(key):
    k_params, k_scales = jax.random.split(key)
    params = task.init(k_params)
    scales = sample_scales(k_scales, params, augment_scale)
    w = jax.tree.map(jnp.divide, params, scales)
    return LOInnerState(w, lopt.init_state(w, update_scales, lo_config, muon_fan_in),
                        scales)

  def step(theta, state, key, t, horizon):
    del t  # the LO counts its own steps
    batch = task.sample_batch(key)
    loss_fn = lambda w: task.loss(jax.tree.map(jnp.multiply, w, state.scales), batch)
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    kwargs = dict(value=loss, num_steps=horizon) if informed else {}
    updates, opt_state = lopt.update(lo_config, theta, grads, state.opt_state,
                                     state.params, muon_fan_in=muon_fan_in, **kwargs)
    params = optax.apply_updates(state.params, updates)
    return LOInnerState(params, opt_state, state.scales), loss

  label = name or f"{task.name}/{'informed' if informed else 'blind'}"
  return InnerProblem(init=init, step=step, name=label)
