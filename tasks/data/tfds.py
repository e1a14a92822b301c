"""TFDS image datasets (MNIST, Fashion-MNIST, CIFAR-10) read offline from ``data_dir``.

Reads TFDS's array_record files with ``tfds.data_source`` (no TensorFlow) and never
downloads: the dataset must have been prepared beforehand with
``file_format="array_record"``. Images are resized to ``image_size`` px (bilinear with
antialiasing), optionally converted to grayscale, and standardized by the train set's
global mean and std: float32 ``(n, image_size, image_size, channels)``, labels int32
``(n,)``, ``channels`` 1 for MNIST/Fashion-MNIST or grayscale, else 3.

``tensorflow-datasets`` is an optional extra (``pip install metaopt[tfds]``); it is
imported only when a dataset is loaded.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os

import jax
import numpy as np

from tasks.data.dataset import ArrayDataset, standardize

# name -> (native size, channels, classes)
DATASETS = {"mnist": (28, 1, 10), "fashion_mnist": (28, 1, 10), "cifar10": (32, 3, 10)}
IMAGE_SIZES = (8, 16, 32)
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


class DatasetNotPreparedError(FileNotFoundError):
  """Raised when a TFDS dataset is absent from ``data_dir`` (we never download)."""


@dataclasses.dataclass(frozen=True)
class TFDSImageData:
  """An image classification dataset prepared by TFDS as array_record.

  Attributes:
    name: ``"mnist"``, ``"fashion_mnist"`` or ``"cifar10"``.
    data_dir: the TFDS data directory holding the prepared dataset.
    image_size: side length after resizing: 8, 16 or 32.
    grayscale: convert RGB to one luminance channel.
    max_examples: keep at most this many examples per split (None: all).
  """

  name: str = "mnist"
  data_dir: str = "~/tensorflow_datasets"
  image_size: int = 16
  grayscale: bool = False
  max_examples: int | None = None

  def __post_init__(self):
    if self.name not in DATASETS:
      raise ValueError(f"TFDSImageData.name={self.name!r}; expected one of {sorted(DATASETS)}.")
    if self.image_size not in IMAGE_SIZES:
      raise ValueError(f"TFDSImageData.image_size={self.image_size}; expected one of "
                       f"{IMAGE_SIZES}.")

  @property
  def channels(self) -> int:
    return 1 if self.grayscale else DATASETS[self.name][1]

  @property
  def input_shape(self) -> tuple[int, ...]:
    return (self.image_size, self.image_size, self.channels)

  @property
  def num_outputs(self) -> int:
    return DATASETS[self.name][2]


def prepare_command(name: str, data_dir: str) -> str:
  """The shell command that prepares ``name`` in ``data_dir`` as array_record."""
  return f"tfds build {name} --data_dir={data_dir} --file_format=array_record"


def prepared_files(name: str, data_dir: str, split: str) -> list[str]:
  """array_record shards of ``name``/``split`` under ``data_dir`` (any version)."""
  root = os.path.join(os.path.expanduser(data_dir), name)
  return sorted(glob.glob(os.path.join(root, "**", f"{name}-{split}.array_record*"),
                          recursive=True))


def check_prepared(name: str, data_dir: str, split: str) -> None:
  """Raises :class:`DatasetNotPreparedError` unless the split's files are present."""
  if prepared_files(name, data_dir, split):
    return
  root = os.path.join(os.path.expanduser(data_dir), name)
  other = glob.glob(os.path.join(root, "**", f"{name}-{split}.tfrecord*"), recursive=True)
  found = (f" Found TFRecord files ({other[0]}), but the adapter reads array_record only "
           "(no TensorFlow); rebuild with file_format=array_record." if other else "")
  raise DatasetNotPreparedError(
      f"TFDS dataset {name!r} (split {split!r}) is not prepared in data_dir="
      f"{data_dir!r}: no {name}-{split}.array_record* under {root}.{found} metaopt never "
      "downloads data. Prepare it once on a machine with network access:\n"
      f"  pip install tensorflow-datasets && {prepare_command(name, data_dir)}\n"
      "(or tfds.builder(name, data_dir=..., file_format='array_record')"
      ".download_and_prepare()) and copy the directory here.")


def _to_float(images: np.ndarray, config: TFDSImageData) -> np.ndarray:
  """uint8 (n, h, w, c) -> float32 in [0, 1], grayscale if asked, resized (in chunks)."""
  out = []
  for i in range(0, len(images), 4096):
    chunk = images[i:i + 4096].astype(np.float32) / 255.0
    if config.grayscale and chunk.shape[-1] == 3:
      chunk = chunk @ _LUMA[:, None]
    if chunk.shape[1] != config.image_size:
      shape = (len(chunk), config.image_size, config.image_size, chunk.shape[-1])
      chunk = np.asarray(jax.image.resize(chunk, shape, "linear", antialias=True))
    out.append(chunk.astype(np.float32))
  return np.concatenate(out)


def _read_split(config: TFDSImageData, split: str) -> tuple[np.ndarray, np.ndarray]:
  check_prepared(config.name, config.data_dir, split)
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("TFDS datasets need the optional extra: pip install "
                      "'metaopt[tfds]' (tensorflow-datasets, no TensorFlow).") from e
  source = tfds.data_source(config.name, split=split,
                            data_dir=os.path.expanduser(config.data_dir), download=False)
  n = len(source) if config.max_examples is None else min(len(source), config.max_examples)
  records = [source[i] for i in range(n)]
  images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
  labels = np.asarray([r["label"] for r in records], dtype=np.int32)
  return _to_float(images, config), labels


@functools.lru_cache(maxsize=None)
def load_tfds_images(config: TFDSImageData) -> ArrayDataset:
  """Loads, resizes and standardizes both splits (cached per config)."""
  train_x, train_y = _read_split(config, "train")
  test_x, test_y = _read_split(config, "test")
  train_x, test_x = standardize(train_x, test_x)
  return ArrayDataset(config.name, train_x, train_y, test_x, test_y,
                      DATASETS[config.name][2])
