"""Rough cost model: seconds per AdamW training step on the reference 2-core CPU.

``step_seconds = OVERHEAD_S + S_PER_MAC * 3 * macs + S_PER_PARAM * params
+ S_PER_ELEMENT * elements``, where ``macs`` are the forward multiply-adds of one batch
(x3 for forward + backward), ``params`` the parameter count (optimizer update) and
``elements`` the activation elements of one batch's forward pass (elementwise work:
nonlinearities, softmaxes, norms). The constants are fitted with
``benchmarks/task_throughput.py --calibrate`` on a shared 2-core x86 CPU; estimates are
within about 2x of measurements, enough to size suites.
"""

from __future__ import annotations

import math
from typing import Any

from tasks.data import text
from tasks.models import conv
from tasks.models import logistic
from tasks.models import mlp
from tasks.models import quadratic
from tasks.models import sp_autoencoder
from tasks.models import sp_convnet
from tasks.models import sp_recurrent
from tasks.models import sp_regression
from tasks.models import sp_resmlp
from tasks.models import sp_transformer
from tasks.models import transformer
from tasks.models import user

# Fitted on meta_train_default + heldout (jax 0.10.2, 2 shared x86 cores, load ~6).
OVERHEAD_S = 4.4e-6
S_PER_MAC = 4.9e-11
S_PER_PARAM = 6.2e-11
S_PER_ELEMENT = 2.2e-9


def _mlp(c: mlp.MLPConfig) -> tuple[int, int, int]:
  d_in, out, w = math.prod(c.data.input_shape), c.data.num_outputs, c.width
  weights = d_in * w + (c.depth - 1) * w * w + w * out
  elements = c.batch_size * (c.depth * w + out)
  return c.batch_size * weights, weights + c.depth * w + out, elements


def _conv(c: conv.ConvConfig) -> tuple[int, int, int]:
  side, _, c_in = c.data.input_shape
  k2, w, out = c.kernel_size ** 2, c.width, c.data.num_outputs
  macs, params, elements = side * side * k2 * c_in * w, k2 * c_in * w, side * side * w
  for _ in range(1, c.depth):
    side = -(-side // 2)
    macs += side * side * k2 * w * w
    params += k2 * w * w
    elements += side * side * (k2 + 1) * w  # im2col patches and outputs
  return (c.batch_size * (macs + w * out), params + w * out + c.depth * w + out,
          c.batch_size * (elements + out))


def _transformer(c: transformer.TransformerLMConfig) -> tuple[int, int, int]:
  return _transformer_counts(c, text.load_corpus(c.corpus).vocab_size)


def _transformer_counts(c, v: int) -> tuple[int, int, int]:
  """A pre-LN LM of ``c``'s width, depth, heads, context, batch and MLP ratio."""
  d, t = c.width, c.context
  block = (4 + 2 * c.mlp_ratio) * d * d
  macs = t * (c.depth * (block + 2 * t * d) + d * v)
  elements = t * (c.depth * ((8 + c.mlp_ratio) * d + 2 * c.heads * t) + d + v)
  return c.batch_size * macs, c.depth * block + (v + t) * d + d * v, c.batch_size * elements


def _logistic(c: logistic.LogisticConfig) -> tuple[int, int, int]:
  out = c.data.num_outputs
  weights = math.prod(c.data.input_shape) * out
  return c.batch_size * weights, weights + out, c.batch_size * out


def _quadratic(c: quadratic.QuadraticConfig) -> tuple[int, int, int]:
  return c.batch_size * c.dim * (c.dim if c.rotate else 1), c.dim, c.batch_size * c.dim


def _user(c: user.UserModelConfig) -> tuple[int, int, int]:
  """The user-written models of :mod:`tasks.models.user` (layer by layer)."""
  w, d, b = c.width, c.depth, c.batch_size
  if c.model in ("autoencoder", "resmlp", "regression"):
    if c.model == "autoencoder":
      sizes = [max(w // 2 ** i, 8) for i in range(d + 1)]
      dims = [64, *sizes, *sizes[-2::-1], 64]
    else:
      d_in, out = (24, 12) if c.model == "resmlp" else (6, 1)
      dims = [d_in, *[w] * (1 if c.model == "resmlp" else d), out]
    weights = sum(a * z for a, z in zip(dims, dims[1:]))
    units = sum(dims[1:])
    if c.model == "resmlp":  # blocks: LayerNorm, w -> 2w -> w
      weights += d * 4 * w * w
      units += d * 4 * w + w
    batch = min(b, 512) if c.model == "regression" else b
    return batch * weights, weights + units, batch * units
  if c.model == "transformer_lm":
    return _transformer(transformer.TransformerLMConfig(
        width=w, depth=d, heads=c.heads, context=c.context, batch_size=b, mlp_ratio=4))
  if c.model == "lstm":  # 8 steps of 8 pixels; 4 gates; per-step work counted as elements
    t, f = 8, 8
    gates = 4 * w * (f + w)
    return b * (t * gates + w * 10), gates + 4 * w + 10 * w + 10, b * t * (12 * w)
  # cnn: 3x3 conv 1 -> 16 at 8x8, 3x3 conv 16 -> 32 stride 2 (4x4), 2x2 pool, dense.
  macs = 64 * 9 * 16 + 16 * 9 * 16 * 32 + 128 * w + w * 10
  params = 9 * 16 + 16 + 9 * 16 * 32 + 32 + 128 * w + w + 10 * w + 10
  return b * macs, params, b * (64 * 16 + 16 * 10 * 32 + 4 * 32 + w + 10)


def _dense_counts(dims: list[int], batch: int, extra_params: int = 0,
                 extra_units: int = 0) -> tuple[int, int, int]:
  """A chain of dense layers ``dims[0] -> dims[1] -> ...`` (plus block extras)."""
  weights = sum(a * z for a, z in zip(dims, dims[1:])) + extra_params
  units = sum(dims[1:]) + extra_units
  return batch * weights, weights + units, batch * units


def _sp_autoencoder(c: sp_autoencoder.SPAutoencoderConfig) -> tuple[int, int, int]:
  sizes = sp_autoencoder.hidden_sizes(c.width, c.depth)
  return _dense_counts([c.input_dim, *sizes, c.input_dim], c.batch_size,
                       extra_units=sum(sizes) if c.layer_norm else 0)


def _sp_resmlp(c: sp_resmlp.SPResMLPConfig) -> tuple[int, int, int]:
  w, x = c.width, c.expansion
  return _dense_counts([math.prod(c.data.input_shape), w, c.data.num_outputs],
                       c.batch_size, extra_params=c.depth * 2 * x * w * w,
                       extra_units=c.depth * (x + 2) * w)


def _sp_regression(c: sp_regression.SPRegressionConfig) -> tuple[int, int, int]:
  return _dense_counts([c.input_dim, *[c.width] * c.depth, 1],
                       min(c.batch_size, c.num_train))


def _sp_transformer(c: sp_transformer.SPTransformerLMConfig) -> tuple[int, int, int]:
  return _transformer_counts(c, c.vocab_size)


def _sp_recurrent(c: sp_recurrent.SPRecurrentConfig) -> tuple[int, int, int]:
  """Per step ``gates * width * (input + width)``; the per-step work counted as elements."""
  gates, w, t = (3 if c.cell == "gru" else 4), c.width, c.length
  lm = c.problem == "language_model"
  d_in, out = (w, c.vocab_size) if lm else (2, 1)
  cell = gates * w * (d_in + w) + (c.depth - 1) * gates * w * 2 * w
  readout = w * out * (t if lm else 1)
  params = cell + c.depth * gates * w + w * out + (c.vocab_size * w if lm else 0)
  return c.batch_size * (t * cell + readout), params, c.batch_size * t * c.depth * 3 * gates * w


def _sp_convnet(c: sp_convnet.SPConvNetConfig) -> tuple[int, int, int]:
  """3x3 convs layer by layer (im2col patches and outputs as elements)."""
  side, _, c_in = sp_convnet.dataset_shape(c)
  macs, params, elements = side * side * 9 * c_in * c.width, 9 * c_in * c.width, 0
  channels = c.width
  for i in range(c.stages):
    f = c.width * 2 ** i
    convs = [(channels, f, 1)] + ([(f, f, 2)] if c.downsample == "stride" else [])
    for a, z, stride in convs:
      out_side = -(-side // stride)
      macs += out_side * out_side * 9 * a * z
      params += 9 * a * z + z
      elements += out_side * out_side * (9 * a + z)
      side = out_side
    if c.downsample != "stride":
      side = -(-side // 2)
    channels = f
  classes = sp_convnet.dataset_classes(c)
  head = (channels * classes if c.head == "global_pool"
          else side * side * channels * 4 * c.width + 4 * c.width * classes)
  return c.batch_size * (macs + head), params + head, c.batch_size * (elements + classes)


_COSTS = {
    mlp.MLPConfig: _mlp,
    conv.ConvConfig: _conv,
    transformer.TransformerLMConfig: _transformer,
    logistic.LogisticConfig: _logistic,
    quadratic.QuadraticConfig: _quadratic,
    user.UserModelConfig: _user,
    sp_autoencoder.SPAutoencoderConfig: _sp_autoencoder,
    sp_resmlp.SPResMLPConfig: _sp_resmlp,
    sp_regression.SPRegressionConfig: _sp_regression,
    sp_transformer.SPTransformerLMConfig: _sp_transformer,
    sp_recurrent.SPRecurrentConfig: _sp_recurrent,
    sp_convnet.SPConvNetConfig: _sp_convnet,
}


def cost_features(config: Any) -> tuple[int, int, int]:
  """(forward multiply-adds of one batch, parameter count, forward activation elements)."""
  if type(config) not in _COSTS:
    raise ValueError(f"no cost model for {type(config).__name__}.")
  return _COSTS[type(config)](config)


def estimate_step_seconds(config: Any) -> float:
  """Estimated seconds of one single-seed AdamW step (scan-unrolled, jitted)."""
  macs, params, elements = cost_features(config)
  return (OVERHEAD_S + S_PER_MAC * 3 * macs + S_PER_PARAM * params
          + S_PER_ELEMENT * elements)
