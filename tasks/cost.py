"""Rough cost model: seconds per AdamW training step on the reference 2-core CPU.

``step_seconds = OVERHEAD_S + S_PER_MAC * train_macs + S_PER_PARAM * params``, where
``train_macs = 3 * forward multiply-adds of one batch`` (forward + backward) and the
per-parameter term covers the optimizer update. The constants are fitted to
``benchmarks/task_throughput.py`` (``--calibrate``) on a shared 2-core x86 CPU; the
estimates are within about 2x of measurements, enough to size suites.
"""

from __future__ import annotations

import math
from typing import Any

from tasks.data import text
from tasks.models import conv
from tasks.models import logistic
from tasks.models import mlp
from tasks.models import quadratic
from tasks.models import transformer

OVERHEAD_S = 2.0e-5
S_PER_MAC = 4.0e-11
S_PER_PARAM = 3.0e-9


def _mlp(c: mlp.MLPConfig) -> tuple[int, int]:
  d_in, out, w = math.prod(c.data.input_shape), c.data.num_outputs, c.width
  weights = d_in * w + (c.depth - 1) * w * w + w * out
  return c.batch_size * weights, weights + c.depth * w + out


def _conv(c: conv.ConvConfig) -> tuple[int, int]:
  side, _, c_in = c.data.input_shape
  k2, w, out = c.kernel_size ** 2, c.width, c.data.num_outputs
  macs, params = side * side * k2 * c_in * w, k2 * c_in * w
  for _ in range(1, c.depth):
    side = -(-side // 2)
    macs += side * side * k2 * w * w
    params += k2 * w * w
  return c.batch_size * (macs + w * out), params + w * out + c.depth * w + out


def _transformer(c: transformer.TransformerLMConfig) -> tuple[int, int]:
  d, t, v = c.width, c.context, text.load_corpus(c.corpus).vocab_size
  block = (4 + 2 * c.mlp_ratio) * d * d
  macs = t * (c.depth * (block + 2 * t * d) + d * v)
  return c.batch_size * macs, c.depth * block + (v + t) * d + d * v


def _logistic(c: logistic.LogisticConfig) -> tuple[int, int]:
  weights = math.prod(c.data.input_shape) * c.data.num_outputs
  return c.batch_size * weights, weights + c.data.num_outputs


def _quadratic(c: quadratic.QuadraticConfig) -> tuple[int, int]:
  return c.batch_size * c.dim * (c.dim if c.rotate else 1), c.dim


_COSTS = {
    mlp.MLPConfig: _mlp,
    conv.ConvConfig: _conv,
    transformer.TransformerLMConfig: _transformer,
    logistic.LogisticConfig: _logistic,
    quadratic.QuadraticConfig: _quadratic,
}


def forward_macs_and_params(config: Any) -> tuple[int, int]:
  """(multiply-adds of one batch's forward pass, approximate parameter count)."""
  return _COSTS[type(config)](config)


def estimate_step_seconds(config: Any) -> float:
  """Estimated seconds of one single-seed AdamW step (scan-unrolled, jitted)."""
  macs, params = forward_macs_and_params(config)
  return OVERHEAD_S + S_PER_MAC * 3 * macs + S_PER_PARAM * params
