"""Multinomial logistic regression (linear softmax classifier or linear regression).

One ``readout`` layer from the flattened input to the classes: an ``output`` role whose
base fan-in is its fan-in (no width, so no muP scaling). muP zero-initializes it; SP
uses N(0, 1/fan_in).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from metaopt import mup
from tasks import base
from tasks import data as data_lib
from tasks.models import _common


@dataclasses.dataclass(frozen=True)
class LogisticConfig:
  """Attributes: data config, batch size, muP (zero init) or SP init."""

  data: Any = data_lib.DigitsData()
  batch_size: int = 128
  mup: bool = True

  @property
  def name(self) -> str:
    return (f"logistic_{_common.data_name(self.data)}_b{self.batch_size}_"
            f"{'mup' if self.mup else 'sp'}")


def build(config: LogisticConfig, num_steps: int = base.DEFAULT_NUM_STEPS) -> base.Task:
  dataset = data_lib.load(config.data)
  input_dim = math.prod(dataset.input_shape)
  roles = {"readout": {"kernel": mup.output_role(input_dim, input_dim),
                       "bias": mup.vector_role()}}
  model = nn.Dense(dataset.num_outputs, kernel_init=_common.readout_init(config.mup))
  dummy = jnp.zeros((1, input_dim), jnp.float32)

  def init(key):
    return {"readout": model.init(key, dummy)["params"]}

  def apply(params, x):
    return model.apply({"params": params["readout"]}, x.reshape((x.shape[0], -1)))

  return base.supervised_task(
      name=config.name, config=config, init=init, apply=apply,
      num_classes=dataset.num_classes,
      sample_batch=data_lib.batch_sampler(dataset, config.batch_size),
      eval_batch=lambda: data_lib.fixed_batch(dataset), roles=roles, num_steps=num_steps,
      activations=lambda params, batch: {"logits": apply(params, batch["x"])})
