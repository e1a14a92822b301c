"""Models written the way a user writes them: standard init, roles inferred.

Unlike the project's own muP tasks (which state their roles and use muP initializers
and multipliers), these are plain ``flax.linen`` and Haiku models with the frameworks'
default initializations (standard parametrization), and their roles are whatever
:func:`metaopt.mup.infer_roles` makes of the parameter tree -- what a drop-in user of
``metaopt.pretrained().as_optax()`` runs. The families differ from the meta-training
ones (MLPs, logistic regression, a tiny LM, quadratics):

* ``autoencoder`` (Flax): a deep ELU autoencoder reconstructing the 8x8 digits;
* ``transformer_lm`` (Flax): a pre-LN character LM with ``nn.SelfAttention``, a causal
  mask and a learned positional table;
* ``lstm`` (Flax): ``nn.RNN(nn.LSTMCell)`` reading the digits row by row;
* ``cnn`` (Flax): a strided conv net with average pooling on the digits (convs as
  im2col matmuls, parameters and math of ``nn.Conv``);
* ``resmlp`` (Haiku): a residual MLP with LayerNorm on a Gaussian mixture;
* ``regression`` (Haiku): ``hk.nets.MLP`` regression of a smooth function, full-batch.

Recurrent cells use Flax's orthogonal recurrent init, whose QR deadlocks XLA:CPU on 2
cores when batched under ``vmap`` (jax 0.10): their ``init`` runs one key at a time
under ``vmap`` (``jax.custom_batching.sequential_vmap``).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from tasks import base
from tasks import data as data_lib
from tasks.data import text
from tasks.models import _common
from tasks.models import conv
from tasks.models._common import user_roles

USER_MODELS = ("autoencoder", "transformer_lm", "lstm", "cnn", "resmlp", "regression")


@dataclasses.dataclass(frozen=True)
class UserModelConfig:
  """One user-written model and its training setup.

  Attributes:
    model: one of :data:`USER_MODELS`.
    width: hidden width (the autoencoder's widest layer, the LM's model width, the
      LSTM's hidden size, the conv net's dense layer, the MLPs' width).
    depth: hidden layers / residual blocks / transformer blocks.
    batch_size: examples per batch; at least the training set's size means full-batch.
    context: sequence length of the LM.
    heads: attention heads of the LM.
    seed: the seed of generated data (``resmlp``, ``regression``).
  """

  model: str = "autoencoder"
  width: int = 128
  depth: int = 2
  batch_size: int = 64
  context: int = 16
  heads: int = 4
  seed: int = 0

  def __post_init__(self):
    if self.model not in USER_MODELS:
      raise ValueError(f"UserModelConfig.model={self.model!r}; expected one of "
                       f"{USER_MODELS}.")
    if min(self.width, self.depth, self.batch_size, self.context, self.heads) < 1:
      raise ValueError(f"UserModelConfig needs positive sizes, got {self}.")
    if self.model == "transformer_lm" and self.width % self.heads:
      raise ValueError(f"width={self.width} is not divisible by heads={self.heads}.")

  @property
  def name(self) -> str:
    depth = "" if self.model in ("lstm", "cnn") else f"_d{self.depth}"  # fixed depth
    extra = f"_t{self.context}_h{self.heads}" if self.model == "transformer_lm" else ""
    return f"user_{self.model}_w{self.width}{depth}{extra}_b{self.batch_size}"


# ---------------------------------------------------------------------------- data

REGRESSION_TRAIN = 512


@functools.lru_cache(maxsize=None)
def _mixture(seed: int) -> data_lib.ArrayDataset:
  """12 classes of 24-D Gaussians, unit within-class std (not a meta-training mixture)."""
  return data_lib.load(data_lib.GaussianMixtureData(num_classes=12, dim=24,
                                                    separation=3.5, seed=100 + seed))


@functools.lru_cache(maxsize=None)
def _smooth_function(seed: int) -> data_lib.ArrayDataset:
  """``y = sin(3 x0) cos(2 x1) + x2^2 / 2 - x0 x3 + 0.05 eps``, ``x ~ U[-1.5, 1.5]^6``."""
  rng = np.random.default_rng(200 + seed)
  x = rng.uniform(-1.5, 1.5, (REGRESSION_TRAIN + 512, 6))
  y = (np.sin(3 * x[:, 0]) * np.cos(2 * x[:, 1]) + 0.5 * x[:, 2] ** 2 - x[:, 0] * x[:, 3]
       + 0.05 * rng.standard_normal(len(x)))[:, None]
  x, y = x.astype(np.float32), y.astype(np.float32)
  k = REGRESSION_TRAIN
  return data_lib.ArrayDataset("smooth_function", x[:k], y[:k], x[k:], y[k:], 0)


# --------------------------------------------------------------------------- models


class Autoencoder(nn.Module):
  width: int
  depth: int

  @nn.compact
  def __call__(self, x):
    h = x.reshape((x.shape[0], -1))
    sizes = [max(self.width // 2 ** i, 8) for i in range(self.depth + 1)]
    for size in sizes + sizes[-2::-1]:  # 128 64 32 | 64 128: bottleneck in the middle
      h = nn.elu(nn.Dense(size)(h))
    return nn.Dense(x.shape[1] * x.shape[2] * x.shape[3])(h)


class Block(nn.Module):
  heads: int

  @nn.compact
  def __call__(self, x):
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
    x = x + nn.SelfAttention(num_heads=self.heads)(nn.LayerNorm()(x), mask=mask)
    h = nn.gelu(nn.Dense(4 * x.shape[-1])(nn.LayerNorm()(x)))
    return x + nn.Dense(x.shape[-1])(h)


class TransformerLM(nn.Module):
  vocab_size: int
  width: int
  depth: int
  heads: int
  context: int

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab_size, self.width)(tokens)
    pos = self.param("pos", nn.initializers.normal(0.02), (self.context, self.width))
    x = x + pos[:tokens.shape[-1]]
    for _ in range(self.depth):
      x = Block(self.heads)(x)
    return nn.Dense(self.vocab_size)(nn.LayerNorm()(x))


class RowLSTM(nn.Module):
  """Reads an image row by row with an LSTM, classifies from the last hidden state."""

  width: int
  num_classes: int

  @nn.compact
  def __call__(self, x):
    rows = x.reshape((x.shape[0], x.shape[1], -1))  # (B, 8, 8): 8 steps of 8 pixels
    h = nn.RNN(nn.LSTMCell(self.width))(rows)
    return nn.Dense(self.num_classes)(h[:, -1])


class CNN(nn.Module):
  """3x3 convs (the second strided), 2x2 average pooling, two dense layers.

  The convs are :class:`tasks.models.conv.Conv`: the parameters (``Conv_0/kernel`` HWIO,
  ``bias``), default initialization (LeCun normal, zero bias) and math of
  ``nn.Conv(features, (3, 3), strides)``, computed as im2col matmuls because XLA:CPU's
  convolution is 10-50x slower inside vmapped ``lax.scan`` training loops.
  """

  width: int
  num_classes: int

  @nn.compact
  def __call__(self, x):
    x = nn.relu(conv.Conv(16, 3, 1)(x))
    x = nn.relu(conv.Conv(32, 3, 2)(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.width)(x))
    return nn.Dense(self.num_classes)(x)


def _haiku_resmlp(width: int, depth: int, num_outputs: int):
  def forward(x):
    h = hk.Linear(width)(x)
    for _ in range(depth):
      y = hk.LayerNorm(-1, create_scale=True, create_offset=True)(h)
      h = h + hk.Linear(width)(jax.nn.gelu(hk.Linear(2 * width)(y)))
    return hk.Linear(num_outputs)(hk.LayerNorm(-1, create_scale=True, create_offset=True)(h))
  return hk.without_apply_rng(hk.transform(forward))


def _haiku_mlp(width: int, depth: int, num_outputs: int):
  return hk.without_apply_rng(hk.transform(
      lambda x: hk.nets.MLP([width] * depth + [num_outputs], activation=jax.nn.gelu)(x)))


# -------------------------------------------------------------------------- builders


def _spec(config: UserModelConfig):
  """``(init, apply, num_classes, sample_batch, eval_batch)`` of ``config``'s model."""
  w, d = config.width, config.depth
  if config.model in ("autoencoder", "lstm", "cnn"):
    digits = data_lib.load(data_lib.DigitsData())
    dummy = jnp.zeros((1, 8, 8, 1), jnp.float32)
    if config.model == "autoencoder":
      model, classes = Autoencoder(w, d), 0
      target = lambda x: x.reshape((x.shape[0], -1))
    else:
      model = RowLSTM(w, 10) if config.model == "lstm" else CNN(w, 10)
      classes, target = 10, None
    sample_batch, eval_batch = _common.minibatch_or_full_sampler(digits, config.batch_size,
                                                                 target)
    init = lambda key: model.init(key, dummy)["params"]
    apply = lambda params, x: model.apply({"params": params}, x)
    return init, apply, classes, sample_batch, eval_batch
  if config.model == "transformer_lm":
    corpus = text.load_corpus()
    model = TransformerLM(corpus.vocab_size, w, d, config.heads, config.context)
    dummy = jnp.zeros((1, config.context), jnp.int32)
    windows = text.fixed_windows(corpus, config.context)
    return (lambda key: model.init(key, dummy)["params"],
            lambda params, x: model.apply({"params": params}, x), corpus.vocab_size,
            text.window_sampler(corpus, config.batch_size, config.context),
            lambda: windows)
  dataset = _mixture(config.seed) if config.model == "resmlp" else _smooth_function(
      config.seed)
  make = _haiku_resmlp if config.model == "resmlp" else _haiku_mlp
  model = make(w, d, dataset.num_outputs)
  dummy = jnp.zeros((1, *dataset.input_shape), jnp.float32)
  sample_batch, eval_batch = _common.minibatch_or_full_sampler(dataset, config.batch_size)
  return (lambda key: model.init(key, dummy), model.apply, dataset.num_classes,
          sample_batch, eval_batch)


def build(config: UserModelConfig, num_steps: int = base.DEFAULT_NUM_STEPS) -> base.Task:
  """The task of ``config``: its model, data and the roles a user's LO would infer."""
  init, apply, classes, sample_batch, eval_batch = _spec(config)
  roles = user_roles(init)
  if config.model == "lstm":
    init = jax.custom_batching.sequential_vmap(init)  # no batched QR under vmap
  extra = None
  if config.model == "transformer_lm":
    extra = lambda m: {"bits_per_char": m["loss"] / math.log(2.0)}
  return base.supervised_task(
      name=config.name, config=config, init=init, apply=apply, num_classes=classes,
      sample_batch=sample_batch, eval_batch=eval_batch, roles=roles,
      num_steps=num_steps, extra_metrics=extra)
