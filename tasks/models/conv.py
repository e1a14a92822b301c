"""A small conv net (Flax linen): 3x3 convs, global average pooling, linear readout.

``conv_0`` (input role, stride 1) then ``conv_1 .. conv_{depth-1}`` (hidden, stride 2),
all with ``width`` channels and SAME padding, then global average pooling and
``readout``. Conv kernels are ``(k, k, in, out)`` (Flax's HWIO layout), so fan-in is
``k * k * in``. muP vs SP as in :mod:`tasks.models.mlp` (Yang et al, arXiv:2203.03466,
2022).

Convolutions are computed as im2col: the ``k * k`` shifted strided slices of the padded
input, concatenated on the channel axis, times the kernel reshaped to
``(k * k * in, out)``. Same math as ``lax.conv_general_dilated`` (tested), but XLA:CPU
runs ``lax.conv`` about 7x slower inside ``lax.scan`` training loops and lowers it
under ``vmap`` over per-member kernels to slow grouped convolutions; the matmul form is
fast in both.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from metaopt import mup
from tasks import base
from tasks import data as data_lib
from tasks.models import _common


@dataclasses.dataclass(frozen=True)
class ConvConfig:
  """A conv-net image classifier.

  Attributes:
    data: an image data config (``DigitsData()`` or ``TFDSImageData(...)``).
    width: channels of every conv layer.
    depth: number of conv layers (>= 1); layers after the first have stride 2.
    kernel_size: side of the square kernels.
    activation: ``"relu"``, ``"gelu"``, ``"tanh"`` or ``"silu"``.
    batch_size: examples per training batch.
    mup: muP (True) or standard parametrization (False).
    base_width: the width muP's multipliers are relative to.
  """

  data: Any = data_lib.DigitsData()
  width: int = 16
  depth: int = 2
  kernel_size: int = 3
  activation: str = "relu"
  batch_size: int = 64
  mup: bool = True
  base_width: int = 16

  def __post_init__(self):
    _common.activation_fn(self.activation)
    if self.depth < 1 or self.width < 1:
      raise ValueError(f"ConvConfig needs depth >= 1 and width >= 1, got {self}.")

  @property
  def name(self) -> str:
    return (f"conv_{_common.data_name(self.data)}_w{self.width}_d{self.depth}_"
            f"{self.activation}_b{self.batch_size}_{'mup' if self.mup else 'sp'}")


def conv_roles(config: ConvConfig, in_channels: int) -> dict:
  """Role of every parameter. Under SP the base fan-in is the fan-in (no scaling)."""
  k2 = config.kernel_size ** 2
  base_width = config.base_width if config.mup else config.width
  roles = {"conv_0": {"kernel": mup.input_role(k2 * in_channels), "bias": mup.vector_role()}}
  for i in range(1, config.depth):
    roles[f"conv_{i}"] = {"kernel": mup.hidden_role(k2 * config.width, k2 * base_width),
                          "bias": mup.vector_role()}
  roles["readout"] = {"kernel": mup.output_role(config.width, base_width),
                      "bias": mup.vector_role()}
  return roles


def _same_padding(size: int, k: int, stride: int) -> tuple[int, tuple[int, int]]:
  """Output size and (low, high) padding of a SAME convolution along one axis."""
  out = -(-size // stride)
  total = max((out - 1) * stride + k - size, 0)
  return out, (total // 2, total - total // 2)


def conv2d(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """SAME 2-D convolution of NHWC ``x`` with an HWIO ``kernel``, as one matmul."""
  kh, kw = kernel.shape[:2]
  out_h, pad_h = _same_padding(x.shape[-3], kh, stride)
  out_w, pad_w = _same_padding(x.shape[-2], kw, stride)
  xp = jnp.pad(x, ((0, 0),) * (x.ndim - 3) + (pad_h, pad_w, (0, 0)))
  cols = [xp[..., i:i + stride * (out_h - 1) + 1:stride,
             j:j + stride * (out_w - 1) + 1:stride, :]
          for i in range(kh) for j in range(kw)]
  return jnp.concatenate(cols, axis=-1) @ kernel.reshape(-1, kernel.shape[-1])


class Conv(nn.Module):
  """A SAME convolution with bias; parameters ``kernel`` (HWIO) and ``bias``."""

  features: int
  kernel_size: int
  stride: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param("kernel", _common.fan_in_normal, (k, k, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    return conv2d(x, kernel, self.stride) + bias


class ConvNet(nn.Module):
  width: int
  depth: int
  kernel_size: int
  num_outputs: int
  activation: str
  mup: bool
  output_multiplier: float

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act = _common.activation_fn(self.activation)
    h = x
    for i in range(self.depth):
      stride = 1 if i == 0 else 2
      h = act(Conv(self.width, self.kernel_size, stride, name=f"conv_{i}")(h))
      self.sow("intermediates", f"hidden_{i}", h)
    h = jnp.mean(h, axis=(1, 2))
    logits = nn.Dense(self.num_outputs, kernel_init=_common.readout_init(self.mup),
                      name="readout")(h)
    return logits * self.output_multiplier


def build(config: ConvConfig, num_steps: int = base.DEFAULT_NUM_STEPS) -> base.Task:
  dataset = data_lib.load(config.data)
  if len(dataset.input_shape) != 3 or not dataset.is_classification:
    raise ValueError(f"ConvConfig needs an image classification dataset, got {config.data}.")
  roles = conv_roles(config, dataset.input_shape[-1])
  model = ConvNet(config.width, config.depth, config.kernel_size, dataset.num_outputs,
                  config.activation, config.mup, roles["readout"]["kernel"].output_multiplier)
  init, apply, activations = _common.flax_functions(
      model, jnp.zeros((1, *dataset.input_shape), jnp.float32))

  return base.supervised_task(
      name=config.name, config=config, init=init, apply=apply,
      num_classes=dataset.num_classes,
      sample_batch=data_lib.batch_sampler(dataset, config.batch_size),
      eval_batch=lambda: data_lib.fixed_batch(dataset), roles=roles,
      num_steps=num_steps, activations=activations)

