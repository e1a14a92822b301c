"""A user-shaped pre-LN transformer LM: flax.linen defaults, roles inferred.

Part of the user-shaped meta-training distribution (:mod:`tasks.suites`): a
decoder-only LM as a user writes it with ``nn.MultiHeadDotProductAttention`` (causal
mask), ``nn.LayerNorm`` or ``nn.RMSNorm`` before each sublayer, a learned positional
table ``pos_embedding`` and an untied ``nn.Dense`` readout; every initializer is
Flax's default (standard parametrization) and the roles are what
:func:`metaopt.mup.infer_roles` makes of the tree, as for a drop-in user.

How it differs from ``heldout-user``'s ``transformer_lm`` (``nn.SelfAttention``,
LayerNorm, GELU MLP x4 on the stdlib character corpus): it reads tokens of a random
Markov chain (:func:`tasks.data.procedural.markov_corpus`, order 1 or 2, vocabulary
16-64) instead of text, and varies the norm (LayerNorm / RMSNorm), the MLP's width ratio
and activation, and whether attention projections carry biases.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from flax import linen as nn

from tasks import base
from tasks.data import procedural
from tasks.data import text
from tasks.models import _common
from tasks.models._common import user_roles

@dataclasses.dataclass(frozen=True)
class SPTransformerLMConfig:
  """A standard-parametrization pre-LN LM on Markov-chain tokens.

  Attributes:
    width: model dimension (divisible by ``heads``).
    depth: transformer blocks.
    heads: attention heads.
    context: tokens per sequence.
    batch_size: sequences per batch.
    norm: ``"layernorm"`` or ``"rmsnorm"``.
    mlp_ratio: MLP hidden width / ``width``.
    activation: the MLP's nonlinearity (``relu``, ``gelu``, ``tanh``, ``silu``).
    attention_bias: whether the q/k/v/out projections have biases.
    vocab_size: tokens of the Markov chain.
    markov_order: 1 or 2 (the next token depends on that many previous ones).
    seed: the chain's seed.
  """

  width: int = 64
  depth: int = 2
  heads: int = 4
  context: int = 32
  batch_size: int = 32
  norm: str = "layernorm"
  mlp_ratio: int = 4
  activation: str = "gelu"
  attention_bias: bool = True
  vocab_size: int = 32
  markov_order: int = 2
  seed: int = 0

  def __post_init__(self):
    _common.activation_fn(self.activation)
    if self.norm not in _common.NORMS:
      raise ValueError(f"SPTransformerLMConfig.norm={self.norm!r}; expected one of "
                       f"{sorted(_common.NORMS)}.")
    if self.width % self.heads:
      raise ValueError(f"width={self.width} is not divisible by heads={self.heads}.")
    if min(self.width, self.depth, self.context, self.batch_size, self.mlp_ratio) < 1:
      raise ValueError(f"SPTransformerLMConfig needs positive sizes, got {self}.")

  @property
  def name(self) -> str:
    bias = "" if self.attention_bias else "_nobias"
    return (f"sp_lm_w{self.width}_d{self.depth}_h{self.heads}_t{self.context}_"
            f"{self.norm}_r{self.mlp_ratio}_{self.activation}{bias}_v{self.vocab_size}"
            f"o{self.markov_order}s{self.seed}_b{self.batch_size}")


class _Block(nn.Module):
  heads: int
  norm: str
  mlp_ratio: int
  activation: str
  attention_bias: bool

  @nn.compact
  def __call__(self, x):
    norm = _common.NORMS[self.norm]
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
    y = norm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads,
                                            use_bias=self.attention_bias)(y, y, mask=mask)
    h = _common.activation_fn(self.activation)(
        nn.Dense(self.mlp_ratio * x.shape[-1])(norm()(x)))
    return x + nn.Dense(x.shape[-1])(h)


class SPTransformerLM(nn.Module):
  config: SPTransformerLMConfig

  @nn.compact
  def __call__(self, tokens):
    c = self.config
    x = nn.Embed(c.vocab_size, c.width)(tokens)
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (c.context, c.width))
    x = x + pos[:tokens.shape[-1]]
    for _ in range(c.depth):
      x = _Block(c.heads, c.norm, c.mlp_ratio, c.activation, c.attention_bias)(x)
    return nn.Dense(c.vocab_size)(_common.NORMS[c.norm]()(x))


def build(config: SPTransformerLMConfig,
          num_steps: int = base.DEFAULT_NUM_STEPS) -> base.Task:
  """The LM task of ``config``, with the roles a user's LO would infer."""
  corpus = procedural.markov_corpus(config.vocab_size, config.markov_order, config.seed)
  model = SPTransformerLM(config)
  dummy = jnp.zeros((1, config.context), jnp.int32)
  init = lambda key: model.init(key, dummy)["params"]
  apply = lambda params, x: model.apply({"params": params}, x)
  windows = text.fixed_windows(corpus, config.context)
  return base.supervised_task(
      name=config.name, config=config, init=init, apply=apply,
      num_classes=config.vocab_size,
      sample_batch=text.window_sampler(corpus, config.batch_size, config.context),
      eval_batch=lambda: windows, roles=user_roles(init), num_steps=num_steps,
      extra_metrics=lambda m: {"bits_per_token": m["loss"] / math.log(2.0)})

