"""A character-level text corpus that ships with every CPython: email/architecture.rst.

``Lib/email/architecture.rst`` is a plain ASCII text file (9561 characters) inside the
standard library's ``email`` package, read with :mod:`importlib.resources`; it has not
changed in years (its SHA-256 is recorded, per Python version, in
``tests/test_tasks_data.py``). The vocabulary is the sorted set of its characters (70 for
this file); the first 90% of the characters are the train split, the rest the test split.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.resources
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

CORPORA = {"email_architecture": ("email", "architecture.rst")}
TRAIN_FRACTION = 0.9


@dataclasses.dataclass(frozen=True, eq=False)
class TextCorpus:
  name: str
  chars: str  # the vocabulary: token i is chars[i]
  train_tokens: np.ndarray  # int32 (n,)
  test_tokens: np.ndarray

  @property
  def vocab_size(self) -> int:
    return len(self.chars)

  def decode(self, tokens) -> str:
    return "".join(self.chars[int(t)] for t in np.asarray(tokens).reshape(-1))


def corpus_text(name: str = "email_architecture") -> str:
  """The raw text of a named standard-library corpus."""
  if name not in CORPORA:
    raise ValueError(f"unknown corpus {name!r}; expected one of {sorted(CORPORA)}.")
  package, resource = CORPORA[name]
  return importlib.resources.files(package).joinpath(resource).read_text(encoding="utf-8")


def corpus_sha256(name: str = "email_architecture") -> str:
  return hashlib.sha256(corpus_text(name).encode("utf-8")).hexdigest()


@functools.lru_cache(maxsize=None)
def load_corpus(name: str = "email_architecture") -> TextCorpus:
  text = corpus_text(name)
  chars = "".join(sorted(set(text)))
  index = {c: i for i, c in enumerate(chars)}
  tokens = np.asarray([index[c] for c in text], np.int32)
  k = int(len(tokens) * TRAIN_FRACTION)
  return TextCorpus(name, chars, tokens[:k], tokens[k:])


def window_sampler(corpus: TextCorpus, batch_size: int, context: int):
  """Returns ``sample_batch(key, split="train") -> {"x": (B, T), "y": (B, T)}``.

  Random windows of ``context + 1`` characters; ``y`` is ``x`` shifted by one.
  Jittable and vmappable (the token arrays are closed-over constants).
  """
  arrays = {"train": jnp.asarray(corpus.train_tokens), "test": jnp.asarray(corpus.test_tokens)}

  def sample_batch(key: jax.Array, split: str = "train") -> dict[str, Any]:
    if split not in arrays:
      raise ValueError(f"split={split!r}; expected one of {tuple(arrays)}.")
    tokens = arrays[split]
    start = jax.random.randint(key, (batch_size, 1), 0, tokens.shape[0] - context)
    windows = tokens[start + jnp.arange(context + 1)]
    return {"x": windows[:, :-1], "y": windows[:, 1:]}

  return sample_batch


def fixed_windows(corpus: TextCorpus, context: int, split: str = "test",
                  size: int = 64) -> dict[str, Any]:
  """Up to ``size`` evenly spaced windows of ``split``: a fixed eval batch."""
  tokens = corpus.train_tokens if split == "train" else corpus.test_tokens
  starts = np.linspace(0, len(tokens) - context - 1, size).astype(np.int64)
  windows = tokens[starts[:, None] + np.arange(context + 1)]
  return {"x": jnp.asarray(windows[:, :-1]), "y": jnp.asarray(windows[:, 1:])}
