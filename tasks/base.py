"""The Task protocol: a training problem as pure, jittable functions.

A :class:`Task` bundles ``init``, ``loss``, ``metrics`` and an on-device
``sample_batch`` with the muP role of every parameter (:mod:`metaopt.mup`), stated by
the model definition. Everything is a pure function of explicit inputs, so a population
of instances of one config (different init keys and data orders) is a ``jax.vmap`` over
keys::

    task = tasks.build(tasks.MLPConfig(width=64))
    params = jax.vmap(task.init)(jax.random.split(key, 8))
    batch = jax.vmap(task.sample_batch)(jax.random.split(data_key, 8))
    losses = jax.vmap(task.loss)(params, batch)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from metaopt import mup

Params = Any
Batch = Any

DEFAULT_NUM_STEPS = 1000


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
  """One training problem.

  Attributes:
    name: a short readable name, unique within a suite.
    config: the frozen config dataclass it was built from (``tasks.build(config)``).
    init: ``key -> params``; every leaf float32.
    loss: ``(params, batch) -> scalar`` training objective.
    metrics: ``(params, batch) -> dict`` with ``"loss"`` and, for classification,
      ``"accuracy"`` (fraction in [0, 1]).
    sample_batch: ``(key, split="train") -> batch``; jittable and vmappable over
      ``key`` (data lives in device memory). ``split`` is ``"train"`` or ``"test"``.
    eval_batch: ``() -> batch``, a fixed batch of the test split for evaluation.
    roles: a :class:`metaopt.mup.ParamRole` tree with the structure of the params.
    num_steps: the default training budget (suites override it).
    activations: optional ``(params, batch) -> dict`` of named hidden activations and
      ``"logits"`` (for muP coordinate checks); ``None`` where it does not apply.
  """

  name: str
  config: Any
  init: Callable[[jax.Array], Params]
  loss: Callable[[Params, Batch], jax.Array]
  metrics: Callable[[Params, Batch], dict[str, jax.Array]]
  sample_batch: Callable[..., Batch]
  eval_batch: Callable[[], Batch]
  roles: Any
  num_steps: int = DEFAULT_NUM_STEPS
  activations: Callable[[Params, Batch], dict[str, jax.Array]] | None = None

  def __post_init__(self):
    shapes = jax.eval_shape(self.init, jax.random.key(0))
    object.__setattr__(self, "_param_shapes", shapes)  # computed once; the task is frozen
    mup.check_roles(shapes, self.roles)
    bad = [jax.tree_util.keystr(p) for p, s in jax.tree_util.tree_flatten_with_path(shapes)[0]
           if s.dtype != jnp.float32]
    if bad:
      raise ValueError(f"task {self.name}: parameters must be float32; not {bad[:5]}.")

  def param_shapes(self) -> Params:
    """``jax.ShapeDtypeStruct`` tree of the parameters (no computation)."""
    return self._param_shapes

  def num_params(self) -> int:
    return sum(int(s.size) for s in jax.tree.leaves(self.param_shapes()))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy over every leading axis (labels are ints)."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def mean_squared_error(predictions: jax.Array, targets: jax.Array) -> jax.Array:
  """``0.5 * mean((predictions - targets)^2)`` over every axis."""
  return 0.5 * jnp.mean(jnp.square(predictions - targets))


def supervised_task(*, name: str, config: Any, init: Callable, apply: Callable,
                    num_classes: int, sample_batch: Callable, eval_batch: Callable,
                    roles: Any, num_steps: int = DEFAULT_NUM_STEPS,
                    activations: Callable | None = None,
                    extra_metrics: Callable[[dict], dict] | None = None) -> Task:
  """A Task whose batches are ``{"x", "y"}`` and whose model is ``apply(params, x)``.

  Classification (``num_classes > 0``): cross-entropy, metrics loss and accuracy.
  Regression (``num_classes == 0``): half mean squared error, metric loss.
  ``extra_metrics`` maps those metrics to more entries (e.g. bits per character).
  """

  def loss(params, batch):
    out = apply(params, batch["x"])
    if num_classes:
      return cross_entropy(out, batch["y"])
    return mean_squared_error(out, batch["y"])

  def metrics(params, batch):
    out = apply(params, batch["x"])
    if num_classes:
      m = {"loss": cross_entropy(out, batch["y"]), "accuracy": accuracy(out, batch["y"])}
    else:
      m = {"loss": mean_squared_error(out, batch["y"])}
    return {**m, **extra_metrics(m)} if extra_metrics else m

  return Task(name=name, config=config, init=init, loss=loss, metrics=metrics,
              sample_batch=sample_batch, eval_batch=eval_batch, roles=roles,
              num_steps=num_steps, activations=activations)
