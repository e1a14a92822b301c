"""A user-shaped conv net with strides and pooling: flax.linen defaults, roles inferred.

Part of the user-shaped meta-training distribution (:mod:`tasks.suites`): a stem conv,
then ``stages`` of a 3x3 conv followed by a downsampling -- a stride-2 conv, 2x2 max
pooling or 2x2 average pooling -- with channels doubling per stage, an optional
``nn.LayerNorm`` over channels after each conv, and a head of global average pooling
(or flattening) and ``nn.Dense`` layers. Flax's default initializations (LeCun normal,
zero biases), roles from :func:`metaopt.mup.infer_roles`. Convolutions are
:class:`tasks.models.conv.Conv` (``nn.Conv``'s parameters, init and math as im2col
matmuls: XLA:CPU's convolution is 10-50x slower inside vmapped ``lax.scan`` loops).

How it differs from ``heldout-user``'s ``cnn`` (conv 16, conv 32 stride 2, 2x2 average
pooling, one hidden dense layer, on the 8x8 digits): the downsampling kind, 1-2 stages
of 8-32 base channels, optional LayerNorm, a global-pool or flatten head, and 12x12
oriented-grating images (:func:`tasks.data.procedural.gratings`) besides the digits.
"""

from __future__ import annotations

import dataclasses
import jax.numpy as jnp
from flax import linen as nn

from tasks import base
from tasks import data as data_lib
from tasks.data import procedural
from tasks.models import _common
from tasks.models import conv

DOWNSAMPLES = ("stride", "maxpool", "avgpool")
HEADS = ("global_pool", "flatten")
DATASETS = ("digits", "gratings")
GRATING_SIZE, GRATING_CLASSES = 12, 6


@dataclasses.dataclass(frozen=True)
class SPConvNetConfig:
  """A standard-parametrization conv-net image classifier.

  Attributes:
    data: ``"digits"`` (8x8, 10 classes) or ``"gratings"`` (12x12, 6 orientations).
    width: channels of the stem; stage ``i`` has ``width * 2 ** i``.
    stages: conv + downsampling stages after the stem.
    downsample: ``"stride"``, ``"maxpool"`` or ``"avgpool"``.
    layer_norm: an ``nn.LayerNorm`` over channels after every conv.
    head: ``"global_pool"`` (mean over space, then the readout) or ``"flatten"``
      (a hidden ``nn.Dense`` of ``4 * width`` units, then the readout).
    batch_size: images per batch.
    seed: the gratings' seed.
  """

  data: str = "digits"
  width: int = 16
  stages: int = 2
  downsample: str = "maxpool"
  layer_norm: bool = False
  head: str = "global_pool"
  batch_size: int = 32
  seed: int = 0

  def __post_init__(self):
    for field, choices in (("data", DATASETS), ("downsample", DOWNSAMPLES),
                           ("head", HEADS)):
      if getattr(self, field) not in choices:
        raise ValueError(f"SPConvNetConfig.{field}={getattr(self, field)!r}; expected "
                         f"one of {choices}.")
    if min(self.width, self.stages, self.batch_size) < 1:
      raise ValueError(f"SPConvNetConfig needs positive sizes, got {self}.")

  @property
  def name(self) -> str:
    data = f"gratings{self.seed}" if self.data == "gratings" else "digits"
    ln = "_ln" if self.layer_norm else ""
    return (f"sp_convnet_{data}_w{self.width}_s{self.stages}_{self.downsample}{ln}_"
            f"{self.head}_b{self.batch_size}")


class SPConvNet(nn.Module):
  config: SPConvNetConfig
  num_classes: int

  @nn.compact
  def __call__(self, x):
    c = self.config

    def conv_block(h, features, stride):
      h = nn.relu(conv.Conv(features, 3, stride)(h))
      return nn.LayerNorm()(h) if c.layer_norm else h

    h = conv_block(x, c.width, 1)
    for i in range(c.stages):
      features = c.width * 2 ** i
      h = conv_block(h, features, 1)
      if c.downsample == "stride":
        h = conv_block(h, features, 2)
      elif c.downsample == "maxpool":
        h = nn.max_pool(h, (2, 2), strides=(2, 2), padding="SAME")
      else:
        h = nn.avg_pool(h, (2, 2), strides=(2, 2), padding="SAME")
    if c.head == "global_pool":
      h = jnp.mean(h, axis=(1, 2))
    else:
      h = nn.relu(nn.Dense(4 * c.width)(h.reshape((h.shape[0], -1))))
    return nn.Dense(self.num_classes)(h)


def dataset_shape(config: SPConvNetConfig) -> tuple[int, int, int]:
  """``(side, side, channels)`` of the images (without loading them)."""
  side = 8 if config.data == "digits" else GRATING_SIZE
  return (side, side, 1)


def dataset_classes(config: SPConvNetConfig) -> int:
  return 10 if config.data == "digits" else GRATING_CLASSES


def dataset(config: SPConvNetConfig) -> data_lib.ArrayDataset:
  if config.data == "digits":
    return data_lib.load(data_lib.DigitsData())
  return procedural.gratings(GRATING_SIZE, GRATING_CLASSES, config.seed)


def build(config: SPConvNetConfig, num_steps: int = base.DEFAULT_NUM_STEPS) -> base.Task:
  """The classification task of ``config``, with the roles a user's LO would infer."""
  data = dataset(config)
  return _common.flax_user_task(config, SPConvNet(config, data.num_classes), data,
                                num_steps)
