"""Pieces shared by the model definitions: activations, norms, muP/SP initializers, the
Flax init/apply/activations adapter, and the roles and task of user-shaped models."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from metaopt import mup
from tasks import base
from tasks.data import dataset as dataset_lib

from tasks.data import DigitsData
from tasks.data import GaussianMixtureData
from tasks.data import TeacherStudentData
from tasks.data import TFDSImageData

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "tanh": jnp.tanh,
    "silu": jax.nn.silu,
}

# Normalization layers a user picks between (flax.linen defaults).
NORMS = {"layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm}

# N(0, 1/fan_in) (truncated normal rescaled to that variance): input and hidden weights
# under both parametrizations, and the readout under SP.
fan_in_normal = nn.initializers.lecun_normal()


def opaque_zeros(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """Zeros that XLA cannot constant-fold (``normal * 0``; XLA keeps ``x * 0`` for floats).

  Works around an XLA:CPU miscompile (jax 0.10.2, YNNPACK fusions): a dot whose operand
  is a splat constant -- a ``jnp.zeros`` readout when ``init`` and the forward pass share
  one jit -- returns garbage. ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=`` fixes
  it everywhere; this keeps our tasks correct without it
  (``tests/test_tasks_models.py::test_init_and_loss_in_one_jit``).
  """
  return jax.random.normal(key, shape, dtype) * jnp.zeros((), dtype)


def readout_init(mup: bool):
  """muP zero-initializes the readout; SP uses N(0, 1/fan_in)."""
  return opaque_zeros if mup else fan_in_normal


def activation_fn(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"activation={name!r}; expected one of {sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


def data_name(data) -> str:
  """Short name of a data config for task names: digits, gmm, teacher, mnist16g, ..."""
  if isinstance(data, TFDSImageData):
    return f"{data.name}{data.image_size}{'g' if data.grayscale else ''}"
  names = {DigitsData: "digits", GaussianMixtureData: "gmm", TeacherStudentData: "teacher"}
  if type(data) not in names:
    raise ValueError(f"{data!r} is not a data config; expected one of "
                     f"{[c.__name__ for c in (*names, TFDSImageData)]}.")
  return names[type(data)]


def flax_functions(model: nn.Module, dummy_input: jax.Array):
  """``(init, apply, activations)`` of a Flax classifier that ``sow``s its activations.

  ``activations(params, batch)`` returns every sown intermediate plus ``"logits"`` (what
  the muP coordinate check reads).
  """

  def init(key):
    return model.init(key, dummy_input)["params"]

  def apply(params, x):
    return model.apply({"params": params}, x)

  def activations(params, batch):
    logits, state = model.apply({"params": params}, batch["x"], mutable=["intermediates"])
    return {**{k: v[0] for k, v in state["intermediates"].items()}, "logits": logits}

  return init, apply, activations


def minibatch_or_full_sampler(dataset: dataset_lib.ArrayDataset, batch_size: int,
                              target: Callable | None = None):
  """``(sample_batch, eval_batch)``: batches drawn with replacement, or the whole train
  split when ``batch_size`` covers it (full-batch training); ``target(x)`` replaces the
  labels when given (reconstruction)."""
  sample = dataset_lib.batch_sampler(dataset, batch_size)
  full = {s: {"x": jnp.asarray(dataset.split(s)[0]), "y": jnp.asarray(dataset.split(s)[1])}
          for s in dataset_lib.SPLITS}

  def sample_batch(key: jax.Array, split: str = "train") -> dict[str, Any]:
    if batch_size >= dataset.train_x.shape[0]:
      batch = full["train"] if split == "train" else sample(key, split)
    else:
      batch = sample(key, split)
    return {"x": batch["x"], "y": target(batch["x"])} if target else batch

  def eval_batch() -> dict[str, Any]:
    batch = dataset_lib.fixed_batch(dataset)
    return {"x": batch["x"], "y": target(batch["x"])} if target else batch

  return sample_batch, eval_batch


def _shapes_in_order(tree: Any) -> Any:
  """ShapeDtypeStructs of ``tree`` keeping every dict's insertion order.

  ``jax.eval_shape`` (like ``jax.jit``) returns dicts with sorted keys; a user's eager
  ``model.init`` keeps the call order, which :func:`metaopt.mup.infer_roles` reads.
  """
  if isinstance(tree, Mapping):
    return {k: _shapes_in_order(v) for k, v in tree.items()}
  return jax.ShapeDtypeStruct(jnp.shape(tree), jnp.result_type(tree))


def user_roles(init: Callable[[jax.Array], Any]) -> Any:
  """The roles :func:`metaopt.mup.infer_roles` gives the tree ``init`` builds eagerly."""
  captured = {}

  def traced(key):
    params = init(key)
    captured["shapes"] = _shapes_in_order(params)
    return params

  jax.eval_shape(traced, jax.random.key(0))
  return mup.infer_roles(captured["shapes"])


def flax_user_task(config: Any, model: nn.Module, dataset: dataset_lib.ArrayDataset,
                   num_steps: int) -> base.Task:
  """The supervised task of a user-shaped Flax ``model`` on ``dataset``: the model's own
  (default) initialization, roles inferred by :func:`user_roles`, cross-entropy or
  half-MSE by the dataset, batches of ``config.batch_size`` (full-batch when it covers
  the training set)."""
  dummy = jnp.zeros((1, *dataset.input_shape), jnp.float32)
  init = lambda key: model.init(key, dummy)["params"]
  sample_batch, eval_batch = minibatch_or_full_sampler(dataset, config.batch_size)
  return base.supervised_task(
      name=config.name, config=config, init=init,
      apply=lambda params, x: model.apply({"params": params}, x),
      num_classes=dataset.num_classes, sample_batch=sample_batch, eval_batch=eval_batch,
      roles=user_roles(init), num_steps=num_steps)
