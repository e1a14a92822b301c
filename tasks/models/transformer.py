"""Decoder-only transformer character LM (Flax linen), muP or SP behind one flag.

Pre-LayerNorm blocks of causal multi-head attention and a GELU MLP, learned token and
position embeddings, final LayerNorm and an untied readout over the corpus's characters.
Attention projections are ``DenseGeneral`` kernels: query/key/value ``(d, heads,
d_head)`` with fan-in ``d``, out ``(heads, d_head, d)`` with fan-in ``heads * d_head``.

muP (Yang et al, "Tensor Programs V", arXiv:2203.03466, 2022): attention logits scaled
by ``1/d_head`` instead of ``1/sqrt(d_head)``, readout zero-initialized and multiplied by
``base_width / width``; hidden weights N(0, 1/fan_in). Embeddings are ``input`` weights
(one-hot inputs, so fan-in = vocabulary or context) initialized N(0, 1) under both
parametrizations, as Flax's ``nn.Embed`` does. Width grows at fixed ``heads``, so
``d_head`` grows with it.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from metaopt import mup
from tasks import base
from tasks.data import text
from tasks.models import _common

_EMBED_INIT = nn.initializers.normal(stddev=1.0)


@dataclasses.dataclass(frozen=True)
class TransformerLMConfig:
  """A character-level language model on a standard-library text corpus.

  Attributes:
    width: model dimension ``d`` (divisible by ``heads``).
    depth: number of transformer blocks.
    heads: attention heads; ``d_head = width // heads``.
    context: tokens per training sequence.
    batch_size: sequences per batch.
    mup: muP (True) or standard parametrization (False).
    base_width: the width muP's multipliers are relative to.
    mlp_ratio: MLP hidden width / ``width``.
    corpus: a name in ``tasks.data.text.CORPORA``.
  """

  width: int = 32
  depth: int = 1
  heads: int = 2
  context: int = 32
  batch_size: int = 16
  mup: bool = True
  base_width: int = 32
  mlp_ratio: int = 4
  corpus: str = "email_architecture"

  def __post_init__(self):
    if self.width % self.heads:
      raise ValueError(f"width={self.width} is not divisible by heads={self.heads}.")
    if self.depth < 1:
      raise ValueError(f"depth={self.depth}; expected >= 1.")

  @property
  def name(self) -> str:
    return (f"lm_w{self.width}_d{self.depth}_h{self.heads}_t{self.context}_"
            f"b{self.batch_size}_{'mup' if self.mup else 'sp'}")


def transformer_roles(config: TransformerLMConfig, vocab_size: int) -> dict:
  """Role of every parameter. Under SP the base fan-in is the fan-in (no scaling)."""
  d, r = config.width, config.mlp_ratio
  b = config.base_width if config.mup else d
  vec = mup.vector_role()
  ln = {"scale": vec, "bias": vec}
  roles = {"embed": {"embedding": mup.input_role(vocab_size)},
           "pos_embed": mup.input_role(config.context)}
  for i in range(config.depth):
    attn = {name: {"kernel": mup.hidden_role(d, b), "bias": vec}
            for name in ("query", "key", "value", "out")}
    roles[f"block_{i}"] = {
        "ln_1": ln, "attn": attn, "ln_2": ln,
        "mlp_in": {"kernel": mup.hidden_role(d, b), "bias": vec},
        "mlp_out": {"kernel": mup.hidden_role(r * d, r * b), "bias": vec},
    }
  roles["ln_f"] = ln
  roles["readout"] = {"kernel": mup.output_role(d, b), "bias": vec}
  return roles


class CausalSelfAttention(nn.Module):
  heads: int
  logit_scale: float

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    proj = lambda name: nn.DenseGeneral((self.heads, d // self.heads),
                                        kernel_init=_common.fan_in_normal, name=name)(x)
    q, k, v = proj("query"), proj("key"), proj("value")  # (B, T, H, Dh)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * self.logit_scale
    t = x.shape[-2]
    causal = jnp.tril(jnp.ones((t, t), bool))
    logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
    attn = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", attn, v)
    return nn.DenseGeneral(d, axis=(-2, -1), kernel_init=_common.fan_in_normal,
                           name="out")(out)


class TransformerLM(nn.Module):
  width: int
  depth: int
  heads: int
  context: int
  mlp_ratio: int
  vocab_size: int
  mup: bool
  output_multiplier: float

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    d_head = self.width // self.heads
    scale = 1.0 / d_head if self.mup else 1.0 / math.sqrt(d_head)
    h = nn.Embed(self.vocab_size, self.width, embedding_init=_EMBED_INIT, name="embed")(tokens)
    pos = self.param("pos_embed", _EMBED_INIT, (self.context, self.width))
    h = h + pos[:tokens.shape[-1]]
    for i in range(self.depth):
      h = h + _Block(self.heads, scale, self.mlp_ratio, name=f"block_{i}")(h)
      self.sow("intermediates", f"hidden_{i}", h)
    h = nn.LayerNorm(name="ln_f")(h)
    logits = nn.Dense(self.vocab_size, kernel_init=_common.readout_init(self.mup),
                      name="readout")(h)
    return logits * self.output_multiplier


class _Block(nn.Module):
  """Residual branch of one pre-LN block: attn(ln(x)) + mlp(ln(x + attn))."""

  heads: int
  logit_scale: float
  mlp_ratio: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    a = CausalSelfAttention(self.heads, self.logit_scale, name="attn")(
        nn.LayerNorm(name="ln_1")(x))
    y = nn.LayerNorm(name="ln_2")(x + a)
    y = nn.Dense(self.mlp_ratio * d, kernel_init=_common.fan_in_normal, name="mlp_in")(y)
    y = nn.Dense(d, kernel_init=_common.fan_in_normal, name="mlp_out")(jax.nn.gelu(y))
    return a + y


def build(config: TransformerLMConfig,
          num_steps: int = base.DEFAULT_NUM_STEPS) -> base.Task:
  corpus = text.load_corpus(config.corpus)
  roles = transformer_roles(config, corpus.vocab_size)
  model = TransformerLM(config.width, config.depth, config.heads, config.context,
                        config.mlp_ratio, corpus.vocab_size, config.mup,
                        roles["readout"]["kernel"].output_multiplier)
  init, apply, activations = _common.flax_functions(
      model, jnp.zeros((1, config.context), jnp.int32))
  eval_windows = text.fixed_windows(corpus, config.context)

  return base.supervised_task(
      name=config.name, config=config, init=init, apply=apply,
      num_classes=corpus.vocab_size,
      sample_batch=text.window_sampler(corpus, config.batch_size, config.context),
      eval_batch=lambda: eval_windows, roles=roles, num_steps=num_steps,
      activations=activations,
      extra_metrics=lambda m: {"bits_per_char": m["loss"] / math.log(2.0)})

