"""Procedurally generated data for the user-shaped task families (offline, seeded).

Each generator is a pure function of its arguments (``numpy.random.default_rng(seed)``),
cached, so a config names one fixed dataset; none of them is a dataset of the
meta-training muP suite or of ``heldout-user``:

* :func:`markov_corpus`: token streams of a random sparse Markov chain of order 1 or 2
  (a synthetic "language" for LMs: learnable structure, a known entropy floor);
* :func:`manifold_data`: points on a smooth ``latent_dim``-dimensional manifold in
  ``input_dim`` dimensions (``tanh`` of a random linear map), for autoencoders;
* :func:`fourier_regression`: a random sum of sinusoids of the inputs plus noise, with
  a small training set (full-batch training when the batch covers it);
* :func:`gratings`: ``size x size`` images of noisy oriented sine gratings, the class
  being the orientation (image classification other than the 8x8 digits);
* :func:`adding_problem`: on-device batches of Hochreiter's adding problem (sum the two
  marked values of a sequence: long-range memory for recurrent nets).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tasks.data.dataset import ArrayDataset
from tasks.data.text import TextCorpus

MARKOV_TOKENS = 24_000
MARKOV_TEST_FRACTION = 0.1


@functools.lru_cache(maxsize=None)
def markov_corpus(vocab_size: int, order: int, seed: int) -> TextCorpus:
  """A token stream of a random Markov chain whose rows are ``Dirichlet(0.1)``.

  The next token depends on the previous ``order`` tokens (``vocab_size ** order``
  rows); the sparse rows make it predictable well below ``log(vocab_size)`` nats.
  Returned as a :class:`~tasks.data.text.TextCorpus` (printable placeholder
  characters) so the character-LM samplers serve it.
  """
  if order not in (1, 2):
    raise ValueError(f"markov_corpus order={order}; expected 1 or 2.")
  rng = np.random.default_rng(1000 + seed)
  cdf = np.cumsum(rng.dirichlet(np.full(vocab_size, 0.1), vocab_size ** order), axis=1)
  u = rng.random(MARKOV_TOKENS)
  tokens = np.zeros(MARKOV_TOKENS, np.int32)
  state = 0
  for t in range(order, MARKOV_TOKENS):
    state = tokens[t - 1] if order == 1 else tokens[t - 2] * vocab_size + tokens[t - 1]
    tokens[t] = min(int(np.searchsorted(cdf[state], u[t])), vocab_size - 1)
  k = int(MARKOV_TOKENS * (1 - MARKOV_TEST_FRACTION))
  chars = "".join(chr(0x30 + i) for i in range(vocab_size))
  return TextCorpus(f"markov{order}_v{vocab_size}_s{seed}", chars, tokens[:k], tokens[k:])


@functools.lru_cache(maxsize=None)
def manifold_data(input_dim: int, latent_dim: int, seed: int, num_train: int = 4096,
                  num_test: int = 1024) -> ArrayDataset:
  """``x = tanh(z A) + 0.05 eps``, ``z ~ N(0, I_latent)``, ``A`` scaled ``2/sqrt(latent)``.

  Targets are the inputs (reconstruction); ``num_classes = 0``.
  """
  rng = np.random.default_rng(2000 + seed)
  a = rng.standard_normal((latent_dim, input_dim)) * 2.0 / np.sqrt(latent_dim)
  z = rng.standard_normal((num_train + num_test, latent_dim))
  x = (np.tanh(z @ a) + 0.05 * rng.standard_normal((len(z), input_dim))).astype(np.float32)
  k = num_train
  return ArrayDataset(f"manifold{input_dim}_{latent_dim}", x[:k], x[:k], x[k:], x[k:], 0)


@functools.lru_cache(maxsize=None)
def fourier_regression(input_dim: int, num_train: int, seed: int, terms: int = 8,
                       num_test: int = 1024) -> ArrayDataset:
  """``y = sum_j a_j sin(w_j . x + b_j) + 0.05 eps``, ``x ~ U[-1, 1]^input_dim``.

  ``w_j ~ N(0, 4 I)``, ``a_j ~ N(0, 1/terms)``, ``b_j ~ U[0, 2 pi)``: a smooth target of
  unit scale with a few octaves of detail.
  """
  rng = np.random.default_rng(3000 + seed)
  w = 2.0 * rng.standard_normal((input_dim, terms))
  b = rng.uniform(0, 2 * np.pi, terms)
  a = rng.standard_normal(terms) / np.sqrt(terms)
  x = rng.uniform(-1, 1, (num_train + num_test, input_dim))
  y = np.sin(x @ w + b) @ a + 0.05 * rng.standard_normal(len(x))
  x, y = x.astype(np.float32), y[:, None].astype(np.float32)
  k = num_train
  return ArrayDataset(f"fourier{input_dim}", x[:k], y[:k], x[k:], y[k:], 0)


@functools.lru_cache(maxsize=None)
def gratings(size: int, num_classes: int, seed: int, num_train: int = 4096,
             num_test: int = 1024) -> ArrayDataset:
  """Noisy sine gratings ``(size, size, 1)``; class ``c`` has orientation ``pi c / C``.

  Spatial frequency (1.5..3 cycles per image), phase and contrast are random per
  image, plus N(0, 0.5^2) pixel noise; standardized to zero mean, unit std.
  """
  rng = np.random.default_rng(4000 + seed)
  n = num_train + num_test
  y = rng.integers(0, num_classes, n).astype(np.int32)
  theta = np.pi * (y + rng.uniform(-0.15, 0.15, n)) / num_classes
  freq = rng.uniform(1.5, 3.0, n) * 2 * np.pi / size
  phase = rng.uniform(0, 2 * np.pi, n)
  contrast = rng.uniform(0.5, 1.5, n)
  grid = np.arange(size) - (size - 1) / 2
  yy, xx = np.meshgrid(grid, grid, indexing="ij")
  proj = (np.cos(theta)[:, None, None] * xx + np.sin(theta)[:, None, None] * yy)
  x = contrast[:, None, None] * np.sin(freq[:, None, None] * proj + phase[:, None, None])
  x = x + 0.5 * rng.standard_normal(x.shape)
  x = ((x - x.mean()) / x.std()).astype(np.float32)[..., None]
  k = num_train
  return ArrayDataset(f"gratings{size}", x[:k], y[:k], x[k:], y[k:], num_classes)


def adding_problem(key: jax.Array, batch_size: int, length: int) -> dict[str, Any]:
  """A batch of the adding problem: ``x`` ``(B, T, 2)`` (value, marker), ``y`` ``(B, 1)``.

  Values ``U(0, 1)``; the marker is 1 at one position of each half of the sequence and
  0 elsewhere; the target is the sum of the two marked values (Hochreiter and
  Schmidhuber, "Long Short-Term Memory", Neural Computation, 1997). Jittable and
  vmappable; the chance-level MSE (predicting 1) is 1/6.
  """
  k_values, k_first, k_second = jax.random.split(key, 3)
  values = jax.random.uniform(k_values, (batch_size, length))
  half = length // 2
  first = jax.random.randint(k_first, (batch_size,), 0, half)
  second = jax.random.randint(k_second, (batch_size,), half, length)
  positions = jnp.arange(length)
  marker = ((positions == first[:, None]) | (positions == second[:, None])).astype(
      jnp.float32)
  x = jnp.stack([values, marker], axis=-1)
  return {"x": x, "y": jnp.sum(values * marker, axis=1, keepdims=True)}
