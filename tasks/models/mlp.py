"""MLP on flattened inputs (Flax linen), muP or SP behind one flag.

Layers ``layer_0`` (input: finite -> width), ``layer_1 .. layer_{depth-1}`` (hidden:
width -> width) and ``readout`` (output: width -> classes). muP (Yang et al, "Tensor
Programs V", arXiv:2203.03466, 2022): input/hidden weights N(0, 1/fan_in), readout
zero-initialized, logits multiplied by ``base_width / width``. SP: every weight
N(0, 1/fan_in), no multiplier. Biases start at zero.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from metaopt import mup
from tasks import base
from tasks import data as data_lib
from tasks.models import _common


@dataclasses.dataclass(frozen=True)
class MLPConfig:
  """An MLP classifier (or regressor, on regression data).

  Attributes:
    data: a data config (``DigitsData()``, ``GaussianMixtureData(...)``, ...).
    width: units of every hidden layer.
    depth: number of hidden layers (>= 1).
    activation: ``"relu"``, ``"gelu"``, ``"tanh"`` or ``"silu"``.
    batch_size: examples per training batch.
    mup: muP (True) or standard parametrization (False).
    base_width: the width muP's multipliers are relative to.
    framework: ``"flax"`` or ``"haiku"`` (same math, same roles).
  """

  data: Any = data_lib.DigitsData()
  width: int = 64
  depth: int = 2
  activation: str = "relu"
  batch_size: int = 64
  mup: bool = True
  base_width: int = 64
  framework: str = "flax"

  def __post_init__(self):
    _common.activation_fn(self.activation)
    if self.depth < 1 or self.width < 1:
      raise ValueError(f"MLPConfig needs depth >= 1 and width >= 1, got {self}.")
    if self.framework not in ("flax", "haiku"):
      raise ValueError(f"MLPConfig.framework={self.framework!r}; expected flax or haiku.")

  @property
  def name(self) -> str:
    hk = "_haiku" if self.framework == "haiku" else ""
    return (f"mlp{hk}_{_common.data_name(self.data)}_w{self.width}_d{self.depth}_"
            f"{self.activation}_b{self.batch_size}_{'mup' if self.mup else 'sp'}")


def layer_names(depth: int) -> list[str]:
  return [f"layer_{i}" for i in range(depth)] + ["readout"]


def mlp_roles(config: MLPConfig, input_dim: int, kernel: str = "kernel",
              bias: str = "bias") -> dict:
  """Role of every MLP parameter. Under SP the base fan-in is the fan-in (no scaling)."""
  base_width = config.base_width if config.mup else config.width
  roles = {"layer_0": {kernel: mup.input_role(input_dim), bias: mup.vector_role()}}
  for i in range(1, config.depth):
    roles[f"layer_{i}"] = {kernel: mup.hidden_role(config.width, base_width),
                           bias: mup.vector_role()}
  roles["readout"] = {kernel: mup.output_role(config.width, base_width),
                      bias: mup.vector_role()}
  return roles


class MLP(nn.Module):
  """Flattens all but the batch axis, ``depth`` hidden layers, then the readout."""

  width: int
  depth: int
  num_outputs: int
  activation: str
  mup: bool
  output_multiplier: float

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act = _common.activation_fn(self.activation)
    h = x.reshape((x.shape[0], -1))
    for i in range(self.depth):
      h = act(nn.Dense(self.width, kernel_init=_common.fan_in_normal, name=f"layer_{i}")(h))
      self.sow("intermediates", f"hidden_{i}", h)
    logits = nn.Dense(self.num_outputs, kernel_init=_common.readout_init(self.mup),
                      name="readout")(h)
    return logits * self.output_multiplier


def build(config: MLPConfig, num_steps: int = base.DEFAULT_NUM_STEPS) -> base.Task:
  """The Flax MLP task of ``config`` (``framework="haiku"`` is built by mlp_haiku)."""
  dataset = data_lib.load(config.data)
  input_dim = math.prod(dataset.input_shape)
  roles = mlp_roles(config, input_dim)
  model = MLP(config.width, config.depth, dataset.num_outputs, config.activation,
              config.mup, roles["readout"]["kernel"].output_multiplier)
  init, apply, activations = _common.flax_functions(
      model, jnp.zeros((1, *dataset.input_shape), jnp.float32))

  return base.supervised_task(
      name=config.name, config=config, init=init, apply=apply,
      num_classes=dataset.num_classes,
      sample_batch=data_lib.batch_sampler(dataset, config.batch_size),
      eval_batch=lambda: data_lib.fixed_batch(dataset), roles=roles,
      num_steps=num_steps, activations=activations)

