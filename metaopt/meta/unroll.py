"""Truncated inner unrolls: K inner steps under ``lax.scan``, vmapped over a population.

The meta-objective of one truncation of member ``i`` is its mean normalized training
loss

.. math::

  L_i = \\frac{1}{K} \\sum_{k=0}^{K-1} \\min\\left(\\frac{\\ell_i(t+k)}{\\ell_i(0)},
        B\\right)

where ``l_i(0)`` is the episode's initial loss (so tasks of different loss scales mix)
and ``B`` the loss bound. With ``log_loss`` each term is instead
``log(max(min(l_i(t+k) / l_i(0), B), 1e-8))``: the linear mean stops rewarding progress
once the loss is a few percent of its initial value, so meta-training on it learns to
descend fast and then stall; the log keeps every further decade worth the same. Once a
loss is NaN/inf the rest of the truncation contributes ``B`` and the member is marked
non-finite (its episode is then reset).

:func:`unroll_population` and :func:`unroll_population_with_grad` shard the population
axis over a 1-D device mesh with ``jax.shard_map``: every device unrolls its own members,
no communication inside the scan.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from metaopt.meta.inner import InnerProblem
from metaopt.meta.population import DATA_STREAM, Population, TruncationSchedule

POP_AXIS = "pop"
_MIN_NORMALIZER = 1e-12
_MIN_LOG_RATIO = 1e-8


@dataclasses.dataclass(frozen=True, eq=False)
class UnrollSpec:
  """What one population unrolls (static).

  Attributes:
    problem: the inner problem of every member.
    schedule: truncation length K and episode horizons.
    loss_bound: B, the cap on the normalized loss (see above).
    unravel: flat theta -> the theta pytree the problem reads.
    mesh: 1-D device mesh over which the population axis is sharded (None: no
      ``shard_map``).
    log_loss: the log meta-objective (see above).
  """

  problem: InnerProblem
  schedule: TruncationSchedule
  loss_bound: float
  unravel: Callable
  mesh: Mesh | None = None
  log_loss: bool = False


def all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


def truncate(problem: InnerProblem, length: int, loss_bound: float,
             theta, member: Population, *, log_loss: bool = False
             ) -> tuple[Population, jax.Array, jax.Array]:
  """One member (no leading axis), K = ``length`` inner steps with ``theta``.

  Returns ``(member, meta_loss, finite)``; ``member.step`` advanced by K.
  """
  data_key = jax.random.fold_in(member.episode_key, DATA_STREAM)

  def body(carry, k):
    inner, normalizer, ok = carry
    t = member.step + k
    inner, loss = problem.step(theta, inner, jax.random.fold_in(data_key, t), t,
                               member.horizon)
    loss = loss.astype(jnp.float32)
    first = jnp.maximum(jnp.abs(jax.lax.stop_gradient(loss)), _MIN_NORMALIZER)
    normalizer = jnp.where(t == 0, first, normalizer)
    ok = ok & jnp.isfinite(loss)
    normalized = jnp.where(ok, jnp.minimum(loss / normalizer, loss_bound), loss_bound)
    if log_loss:
      normalized = jnp.log(jnp.maximum(normalized, _MIN_LOG_RATIO))
    return (inner, normalizer, ok), normalized

  carry = (member.inner, member.normalizer, member.step >= 0)  # True, member-varying
  (inner, normalizer, ok), losses = jax.lax.scan(body, carry, jnp.arange(length))
  finite = ok & all_finite(inner)
  member = member._replace(inner=inner, step=member.step + length, normalizer=normalizer)
  return member, jnp.mean(losses), finite


def _theta_fn(spec: UnrollSpec):
  def fn(theta_flat, member):
    return truncate(spec.problem, spec.schedule.length, spec.loss_bound,
                    spec.unravel(theta_flat), member, log_loss=spec.log_loss)
  return fn


def _shard(fn, mesh: Mesh | None, in_specs, out_specs):
  """``fn`` under ``shard_map`` over the population axis (no collectives inside).

  ``check_vma=False``: a task's own scans may start from a constant carry (``nn.RNN``'s
  zero state, a user's ``lax.scan``) that becomes member-varying in the body; with the
  varying-axes check on, JAX rejects such a scan inside ``shard_map``. Nothing here
  reduces over the mesh, so the check has nothing to protect.
  """
  if mesh is None:
    return fn
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)


def unroll_population(spec: UnrollSpec, thetas: jax.Array, pop: Population
                      ) -> tuple[Population, jax.Array, jax.Array]:
  """Every member one truncation of ``spec``, each with its own flat theta (``[P, d]``).

  Returns ``(population, meta_losses [P], finite [P])``.
  """
  fn = jax.vmap(_theta_fn(spec))
  return _shard(fn, spec.mesh, (P(POP_AXIS), P(POP_AXIS)), P(POP_AXIS))(thetas, pop)


def unroll_population_with_grad(spec: UnrollSpec, theta: jax.Array, pop: Population):
  """Every member one truncation of ``spec`` with the shared flat ``theta``, plus
  d(meta-loss)/d(theta) per member.

  The incoming inner state is a constant (truncated backprop through K steps).
  Returns ``(population, meta_losses [P], grads [P, d], finite [P])``.
  """
  fn = _theta_fn(spec)

  def member_fn(th, member):
    def loss_fn(t):
      new_member, loss, finite = fn(t, member)
      return loss, (new_member, finite)
    (loss, (member, finite)), grad = jax.value_and_grad(loss_fn, has_aux=True)(th)
    return member, loss, grad, finite

  vfn = jax.vmap(member_fn, in_axes=(None, 0))
  return _shard(vfn, spec.mesh, (P(), P(POP_AXIS)), P(POP_AXIS))(theta, pop)
