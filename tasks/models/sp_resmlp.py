"""A user-shaped deep residual MLP with normalization: flax.linen defaults, roles inferred.

Part of the user-shaped meta-training distribution (:mod:`tasks.suites`): an input
``nn.Dense``, ``depth`` pre-norm residual blocks ``h + Dense(act(Dense(norm(h))))``
(``nn.LayerNorm`` or ``nn.RMSNorm``), a final norm and a ``nn.Dense`` readout; Flax's
default initializations (so the residual stream grows with depth, as in a user's
model), roles from :func:`metaopt.mup.infer_roles`. Classification or regression,
by the data config.

How it differs from ``heldout-user``'s ``resmlp`` (Haiku, LayerNorm, 2 blocks on one
12-class Gaussian mixture): Flax, deeper (2-8 blocks), RMSNorm as well as LayerNorm,
expansion ratios 1-4, on the digits, Gaussian mixtures and teacher-student regression.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import linen as nn

from tasks import base
from tasks import data as data_lib
from tasks.models import _common


@dataclasses.dataclass(frozen=True)
class SPResMLPConfig:
  """A standard-parametrization residual MLP.

  Attributes:
    data: a data config (``DigitsData()``, ``GaussianMixtureData(...)``,
      ``TeacherStudentData(...)``).
    width: the residual stream's width.
    depth: residual blocks.
    expansion: a block's hidden width / ``width``.
    norm: ``"layernorm"`` or ``"rmsnorm"``.
    activation: ``relu``, ``gelu``, ``tanh`` or ``silu``.
    batch_size: examples per batch.
  """

  data: Any = data_lib.DigitsData()
  width: int = 64
  depth: int = 4
  expansion: int = 2
  norm: str = "layernorm"
  activation: str = "gelu"
  batch_size: int = 64

  def __post_init__(self):
    _common.activation_fn(self.activation)
    if self.norm not in _common.NORMS:
      raise ValueError(f"SPResMLPConfig.norm={self.norm!r}; expected one of "
                       f"{sorted(_common.NORMS)}.")
    if min(self.width, self.depth, self.expansion, self.batch_size) < 1:
      raise ValueError(f"SPResMLPConfig needs positive sizes, got {self}.")

  @property
  def name(self) -> str:
    return (f"sp_resmlp_{_common.data_name(self.data)}_w{self.width}_d{self.depth}_"
            f"x{self.expansion}_{self.norm}_{self.activation}_b{self.batch_size}")


class SPResMLP(nn.Module):
  config: SPResMLPConfig
  num_outputs: int

  @nn.compact
  def __call__(self, x):
    c = self.config
    norm, act = _common.NORMS[c.norm], _common.activation_fn(c.activation)
    h = nn.Dense(c.width)(x.reshape((x.shape[0], -1)))
    for _ in range(c.depth):
      h = h + nn.Dense(c.width)(act(nn.Dense(c.expansion * c.width)(norm()(h))))
    return nn.Dense(self.num_outputs)(norm()(h))


def build(config: SPResMLPConfig, num_steps: int = base.DEFAULT_NUM_STEPS) -> base.Task:
  """The task of ``config``, with the roles a user's LO would infer."""
  dataset = data_lib.load(config.data)
  return _common.flax_user_task(config, SPResMLP(config, dataset.num_outputs), dataset,
                                num_steps)
