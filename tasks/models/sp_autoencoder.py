"""A user-shaped MLP autoencoder: flax.linen defaults, roles inferred.

Part of the user-shaped meta-training distribution (:mod:`tasks.suites`): an
encoder-decoder of ``nn.Dense`` layers (widths halving to a bottleneck and back, an
optional ``nn.LayerNorm`` after each hidden layer) reconstructing points of a smooth
low-dimensional manifold (:func:`tasks.data.procedural.manifold_data`); Flax's default
initializations, roles from :func:`metaopt.mup.infer_roles`, half-MSE loss.

How it differs from ``heldout-user``'s ``autoencoder`` (ELU, no norm, the 8x8 digits):
generated manifold data of 16-64 dimensions with a latent dimension of 2-8, ReLU / GELU /
tanh / SiLU, optional LayerNorm, 1-3 halvings.
"""

from __future__ import annotations

import dataclasses

from flax import linen as nn

from tasks import base
from tasks.data import procedural
from tasks.models import _common


@dataclasses.dataclass(frozen=True)
class SPAutoencoderConfig:
  """A standard-parametrization MLP autoencoder on manifold data.

  Attributes:
    width: the widest hidden layer (at least ``input_dim``, as a user's would be).
    depth: halvings from ``width`` to the bottleneck (the net has ``2 depth + 1``
      hidden layers).
    activation: ``relu``, ``gelu``, ``tanh`` or ``silu``.
    layer_norm: an ``nn.LayerNorm`` after every hidden layer's activation.
    batch_size: examples per batch.
    input_dim, latent_dim, seed: the manifold (:func:`procedural.manifold_data`).
  """

  width: int = 64
  depth: int = 2
  activation: str = "relu"
  layer_norm: bool = False
  batch_size: int = 64
  input_dim: int = 32
  latent_dim: int = 4
  seed: int = 0

  def __post_init__(self):
    _common.activation_fn(self.activation)
    if self.depth < 1 or self.width < self.input_dim:
      raise ValueError(f"SPAutoencoderConfig needs depth >= 1 and width >= input_dim, "
                       f"got {self}.")

  @property
  def name(self) -> str:
    ln = "_ln" if self.layer_norm else ""
    return (f"sp_ae_m{self.input_dim}l{self.latent_dim}s{self.seed}_w{self.width}_"
            f"d{self.depth}_{self.activation}{ln}_b{self.batch_size}")


def hidden_sizes(width: int, depth: int) -> list[int]:
  """``width, width/2, ..., bottleneck, ..., width`` (at least 4 units each)."""
  down = [max(width // 2 ** i, 4) for i in range(depth + 1)]
  return down + down[-2::-1]


class SPAutoencoder(nn.Module):
  config: SPAutoencoderConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    act = _common.activation_fn(c.activation)
    h = x
    for size in hidden_sizes(c.width, c.depth):
      h = act(nn.Dense(size)(h))
      if c.layer_norm:
        h = nn.LayerNorm()(h)
    return nn.Dense(x.shape[-1])(h)


def build(config: SPAutoencoderConfig, num_steps: int = base.DEFAULT_NUM_STEPS
          ) -> base.Task:
  """The reconstruction task of ``config``, with the roles a user's LO would infer."""
  dataset = procedural.manifold_data(config.input_dim, config.latent_dim, config.seed)
  return _common.flax_user_task(config, SPAutoencoder(config), dataset, num_steps)
