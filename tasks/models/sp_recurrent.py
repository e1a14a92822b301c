"""User-shaped recurrent nets: ``nn.RNN`` of ``nn.GRUCell`` / ``nn.LSTMCell``, roles inferred.

Part of the user-shaped meta-training distribution (:mod:`tasks.suites`), written as a
user writes them with flax.linen's default initializations (orthogonal recurrent
kernels, LeCun-normal input kernels) and roles from :func:`metaopt.mup.infer_roles`.
Two problems:

* ``adding``: Hochreiter's adding problem (:func:`tasks.data.procedural.adding_problem`,
  regression of the sum of two marked values; long-range memory), fresh batches from
  the key (no finite training set);
* ``language_model``: a character-RNN LM over a random Markov chain's tokens
  (``nn.Embed`` -> RNN -> ``nn.Dense`` per step).

How it differs from ``heldout-user``'s ``lstm`` (an LSTM classifying the 8x8 digits read
row by row): other problems (sequence regression, next-token prediction), GRU cells as
well as LSTMs, stacks of 1-2 layers and sequence lengths 10-40.

Flax's orthogonal init runs a QR decomposition; batched under ``vmap`` (a population's
inits) XLA:CPU can deadlock on 2 cores (jax 0.10), so ``init`` runs one key at a time
under ``vmap`` (``jax.custom_batching.sequential_vmap``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from tasks import base
from tasks.data import procedural
from tasks.data import text
from tasks.models._common import user_roles

CELLS = {"gru": nn.GRUCell, "lstm": nn.LSTMCell}
PROBLEMS = ("adding", "language_model")
ADDING_EVAL_SIZE = 512


@dataclasses.dataclass(frozen=True)
class SPRecurrentConfig:
  """A standard-parametrization recurrent net on a sequence problem.

  Attributes:
    cell: ``"gru"`` or ``"lstm"``.
    problem: ``"adding"`` or ``"language_model"``.
    width: hidden size of every layer.
    depth: stacked recurrent layers.
    length: sequence length (steps of the recurrence).
    batch_size: sequences per batch.
    vocab_size, markov_order, seed: the Markov chain of ``language_model``.
  """

  cell: str = "gru"
  problem: str = "adding"
  width: int = 64
  depth: int = 1
  length: int = 20
  batch_size: int = 64
  vocab_size: int = 24
  markov_order: int = 1
  seed: int = 0

  def __post_init__(self):
    if self.cell not in CELLS:
      raise ValueError(f"SPRecurrentConfig.cell={self.cell!r}; expected one of "
                       f"{sorted(CELLS)}.")
    if self.problem not in PROBLEMS:
      raise ValueError(f"SPRecurrentConfig.problem={self.problem!r}; expected one of "
                       f"{PROBLEMS}.")
    if min(self.width, self.depth, self.batch_size) < 1 or self.length < 2:
      raise ValueError(f"SPRecurrentConfig needs positive sizes and length >= 2, got "
                       f"{self}.")

  @property
  def name(self) -> str:
    data = (f"v{self.vocab_size}o{self.markov_order}s{self.seed}"
            if self.problem == "language_model" else "")
    problem = "add" if self.problem == "adding" else "lm"
    return (f"sp_{self.cell}_{problem}{data}_w{self.width}_d{self.depth}_t{self.length}_"
            f"b{self.batch_size}")


class SPRecurrentNet(nn.Module):
  """Stacked ``nn.RNN`` layers; a readout of the last step (adding) or of every step (LM)."""

  config: SPRecurrentConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    lm = c.problem == "language_model"
    h = nn.Embed(c.vocab_size, c.width)(x) if lm else x
    for _ in range(c.depth):
      h = nn.RNN(CELLS[c.cell](c.width))(h)
    return nn.Dense(c.vocab_size)(h) if lm else nn.Dense(1)(h[:, -1])


def _adding_data(config: SPRecurrentConfig):
  sample = lambda key, split="train": procedural.adding_problem(
      jax.random.fold_in(key, split == "test"), config.batch_size, config.length)
  fixed = procedural.adding_problem(jax.random.key(12345), ADDING_EVAL_SIZE, config.length)
  dummy = jnp.zeros((1, config.length, 2), jnp.float32)
  return sample, lambda: fixed, dummy, 0


def _markov_data(config: SPRecurrentConfig):
  corpus = procedural.markov_corpus(config.vocab_size, config.markov_order, config.seed)
  windows = text.fixed_windows(corpus, config.length)
  dummy = jnp.zeros((1, config.length), jnp.int32)
  return (text.window_sampler(corpus, config.batch_size, config.length),
          lambda: windows, dummy, config.vocab_size)


def build(config: SPRecurrentConfig, num_steps: int = base.DEFAULT_NUM_STEPS) -> base.Task:
  """The task of ``config``, with the roles a user's LO would infer."""
  data = _adding_data if config.problem == "adding" else _markov_data
  sample_batch, eval_batch, dummy, classes = data(config)
  model = SPRecurrentNet(config)
  init = lambda key: model.init(key, dummy)["params"]
  roles = user_roles(init)
  return base.supervised_task(
      name=config.name, config=config,
      init=jax.custom_batching.sequential_vmap(init),  # no batched QR under vmap
      apply=lambda params, x: model.apply({"params": params}, x), num_classes=classes,
      sample_batch=sample_batch, eval_batch=eval_batch, roles=roles, num_steps=num_steps)
