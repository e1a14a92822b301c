"""scikit-learn's bundled 8x8 handwritten digits (offline, 1797 images, 10 classes).

The split is fixed: ``numpy.random.RandomState(0).permutation(1797)`` (a frozen stream,
NEP 19); the first 1437 indices are the train set, the last 360 the test set. Pixels
(0..16) are standardized by the train set's global mean and std. Images are
``(8, 8, 1)`` float32; labels int32.

Reference: Alpaydin and Kaynak, "Optical Recognition of Handwritten Digits", UCI
Machine Learning Repository, 1998 (the test part bundled by scikit-learn).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import numpy as np

from tasks.data.dataset import ArrayDataset, standardize

NUM_EXAMPLES = 1797
NUM_TEST = 360
SPLIT_SEED = 0


@dataclasses.dataclass(frozen=True)
class DigitsData:
  """scikit-learn's 8x8 digits with the fixed split above."""

  input_shape: ClassVar[tuple[int, ...]] = (8, 8, 1)
  num_outputs: ClassVar[int] = 10


def split_indices() -> tuple[np.ndarray, np.ndarray]:
  """(train, test) indices of the fixed split."""
  perm = np.random.RandomState(SPLIT_SEED).permutation(NUM_EXAMPLES)
  return perm[:NUM_EXAMPLES - NUM_TEST], perm[NUM_EXAMPLES - NUM_TEST:]


@functools.lru_cache(maxsize=None)
def load_digits(config: DigitsData = DigitsData()) -> ArrayDataset:
  """Loads the digits from scikit-learn's package data (no download)."""
  del config
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  raw = datasets.load_digits()
  images = raw.images.astype(np.float32)[..., None]
  labels = raw.target.astype(np.int32)
  train, test = split_indices()
  train_x, test_x = standardize(images[train], images[test])
  return ArrayDataset("digits", train_x, labels[train], test_x, labels[test], 10)
