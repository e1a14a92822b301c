"""Pieces shared by the model definitions: activations, muP/SP initializers and the
Flax init/apply/activations adapter."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

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
