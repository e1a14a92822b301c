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

A task of your own, from plain functions, is :func:`from_functions`; a
``"package.module:factory"`` string naming a function that returns one is built by
:func:`from_factory` (how ``meta_train.py --task`` and a resumed run get it).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
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


class TaskFactoryError(ValueError):
  """A ``"package.module:factory"`` string that does not give a :class:`Task`."""


@dataclasses.dataclass(frozen=True)
class FunctionTaskConfig:
  """The ``config`` of a task made by :func:`from_functions`: only its name."""

  name: str


def _roles_for(name: str, shapes: Params, roles: Any, base_init: Callable | None) -> Any:
  """A ParamRole tree by :func:`metaopt.mup.resolve_roles` from ``roles`` (roles, labels
  or a callable of params) or a base model's init."""
  if roles is not None and base_init is not None:
    raise ValueError(f"task {name}: pass roles= or base_init=, not both.")
  base = None if base_init is None else jax.eval_shape(base_init, jax.random.key(0))
  return mup.resolve_roles(shapes, roles, base_params=base)


def from_functions(name: str, *, init: Callable[[jax.Array], Params],
                   loss: Callable[[Params, Batch], jax.Array],
                   sample_batch: Callable[[jax.Array], Batch], roles: Any = None,
                   base_init: Callable[[jax.Array], Params] | None = None,
                   metrics: Callable[[Params, Batch], dict[str, jax.Array]] | None = None,
                   eval_batch: Callable[[], Batch] | Batch | None = None,
                   num_steps: int = DEFAULT_NUM_STEPS) -> Task:
  """A :class:`Task` of your own from plain functions (to meta-train or evaluate on).

  Example::

    def init(key):
      k1, k2 = jax.random.split(key)
      return {"w1": jax.random.normal(k1, (4, 32)) / 2, "b1": jnp.zeros(32),
              "w2": jnp.zeros((32, 1)), "b2": jnp.zeros(1)}

    def loss(params, batch):
      h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
      return jnp.mean((h @ params["w2"] + params["b2"] - batch["y"]) ** 2)

    def sample_batch(key):
      x = jax.random.normal(key, (16, 4))
      return {"x": x, "y": jnp.sin(x.sum(-1, keepdims=True))}

    task = tasks.from_functions(
        "my_regression", init=init, loss=loss, sample_batch=sample_batch,
        roles={"w1": "input", "b1": "vector", "w2": "output", "b2": "vector"})

  Args:
    name: the task's name (unique among a run's tasks; logs and checkpoints use it).
    init: ``key -> params``, every leaf float32.
    loss: ``(params, batch) -> scalar``, positive at initialization (the meta-loss is
      normalized by the initial loss).
    sample_batch: ``key -> batch``, on-device: jittable and vmappable over ``key``
      (keep the data in device arrays). A sampler with a ``split`` argument also gets
      ``split="train"`` or ``"test"``; one without serves both splits.
    roles: the muP role of every parameter: a :class:`metaopt.mup.ParamRole` tree, a
      label tree of ``"input"``/``"hidden"``/``"output"``/``"vector"`` (the model is
      its own base: :func:`metaopt.mup.roles_from_labels`), or a callable of the
      parameter shapes returning either.
    base_init: instead of ``roles``, the ``init`` of a narrower base model of the same
      structure; roles follow the muP rule (:func:`metaopt.mup.roles_from_base`).
      With neither, :func:`metaopt.mup.infer_roles` guesses (and warns when unsure).
    metrics: ``(params, batch) -> dict`` with ``"loss"`` (default: the loss alone).
    eval_batch: the fixed test batch, or a ``() -> batch`` (default: one test-split
      batch of ``sample_batch`` from a fixed key).
    num_steps: the default training budget.

  Raises:
    ValueError: roles that do not match the parameters, or non-float32 parameters.
  """
  takes_split = "split" in inspect.signature(sample_batch).parameters

  def sample(key, split="train"):
    return sample_batch(key, split=split) if takes_split else sample_batch(key)

  if eval_batch is None:
    eval_fn = lambda: sample(jax.random.PRNGKey(0), "test")
  elif callable(eval_batch):
    eval_fn = eval_batch
  else:
    eval_fn = lambda: eval_batch
  if metrics is None:
    metrics = lambda params, batch: {"loss": loss(params, batch)}
  shapes = jax.eval_shape(init, jax.random.key(0))
  return Task(name=name, config=FunctionTaskConfig(name), init=init, loss=loss,
              metrics=metrics, sample_batch=sample, eval_batch=eval_fn,
              roles=_roles_for(name, shapes, roles, base_init), num_steps=num_steps)


def from_factory(spec: str) -> Task:
  """The :class:`Task` returned by ``factory()`` for ``spec = "package.module:factory"``.

  The module is imported (it must be on ``sys.path``; ``meta_train.py`` adds the
  working directory), the factory called with no arguments, and its result checked.

  Raises:
    TaskFactoryError: one line naming ``spec`` and what went wrong.
  """
  module_name, colon, attr = str(spec).partition(":")
  if not colon or not module_name or not attr:
    raise TaskFactoryError(f"task factory {spec!r}: expected 'package.module:factory' "
                           "(a module and a function returning a tasks.Task).")
  try:
    module = importlib.import_module(module_name)
  except Exception as e:  # pylint: disable=broad-except  # any error while importing
    raise TaskFactoryError(f"task factory {spec!r}: cannot import module {module_name!r}"
                           f" ({type(e).__name__}: {e}).") from e
  factory = getattr(module, attr, None)
  if not callable(factory):
    raise TaskFactoryError(f"task factory {spec!r}: module {module_name!r} has no "
                           f"function {attr!r}.")
  try:
    task = factory()
  except Exception as e:  # pylint: disable=broad-except  # the user's code
    raise TaskFactoryError(f"task factory {spec!r} raised {type(e).__name__}: {e}") from e
  if not isinstance(task, Task):
    raise TaskFactoryError(f"task factory {spec!r} returned {type(task).__name__}; "
                           "expected a tasks.Task (e.g. from tasks.from_functions).")
  return task
