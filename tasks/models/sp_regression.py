"""A user-shaped MLP regression, mini-batch or full-batch: flax.linen defaults, roles inferred.

Part of the user-shaped meta-training distribution (:mod:`tasks.suites`): ``nn.Dense``
layers fitting a random sum of sinusoids
(:func:`tasks.data.procedural.fourier_regression`) from a small training set of
128-512 points; a batch at least the training set's size trains full-batch (the exact
gradient every step: deterministic problems, where the step size alone decides
convergence). Flax's default initializations, roles from
:func:`metaopt.mup.infer_roles`, half-MSE loss.

How it differs from ``heldout-user``'s ``regression`` (Haiku ``hk.nets.MLP``, GELU, one
fixed 6-D function, 512 points): Flax, other targets (2-8 inputs, seeded sinusoid
sums), tanh / ReLU / SiLU / GELU, training sets of 128-512 and batches of 16 up to the
full set.
"""

from __future__ import annotations

import dataclasses

from flax import linen as nn

from tasks import base
from tasks.data import procedural
from tasks.models import _common


@dataclasses.dataclass(frozen=True)
class SPRegressionConfig:
  """A standard-parametrization MLP regressor on a small generated training set.

  Attributes:
    width: units of every hidden layer.
    depth: hidden layers.
    activation: ``relu``, ``gelu``, ``tanh`` or ``silu``.
    batch_size: examples per batch; ``>= num_train`` is full-batch training.
    input_dim: inputs of the target function.
    num_train: training points.
    seed: the target function's seed.
  """

  width: int = 64
  depth: int = 3
  activation: str = "tanh"
  batch_size: int = 512
  input_dim: int = 4
  num_train: int = 256
  seed: int = 0

  def __post_init__(self):
    _common.activation_fn(self.activation)
    if min(self.width, self.depth, self.batch_size, self.input_dim, self.num_train) < 1:
      raise ValueError(f"SPRegressionConfig needs positive sizes, got {self}.")

  @property
  def full_batch(self) -> bool:
    return self.batch_size >= self.num_train

  @property
  def name(self) -> str:
    batch = "full" if self.full_batch else f"b{self.batch_size}"
    return (f"sp_regression_f{self.input_dim}n{self.num_train}s{self.seed}_w{self.width}_"
            f"d{self.depth}_{self.activation}_{batch}")


class SPRegressionMLP(nn.Module):
  config: SPRegressionConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    act = _common.activation_fn(c.activation)
    for _ in range(c.depth):
      x = act(nn.Dense(c.width)(x))
    return nn.Dense(1)(x)


def build(config: SPRegressionConfig, num_steps: int = base.DEFAULT_NUM_STEPS
          ) -> base.Task:
  """The regression task of ``config``, with the roles a user's LO would infer."""
  dataset = procedural.fourier_regression(config.input_dim, config.num_train, config.seed)
  return _common.flax_user_task(config, SPRegressionMLP(config), dataset, num_steps)
