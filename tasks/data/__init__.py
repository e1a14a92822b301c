"""Offline data for tasks: embedded digits, generated data, stdlib text, TFDS (optional)."""

from tasks.data.dataset import ArrayDataset
from tasks.data.dataset import batch_sampler
from tasks.data.dataset import fixed_batch
from tasks.data.digits import DigitsData
from tasks.data.digits import load_digits
from tasks.data.synthetic import GaussianMixtureData
from tasks.data.synthetic import TeacherStudentData
from tasks.data.synthetic import load_gaussian_mixture
from tasks.data.synthetic import load_teacher_student
from tasks.data.tfds import DatasetNotPreparedError
from tasks.data.tfds import TFDSImageData
from tasks.data.tfds import load_tfds_images

# Data config class -> loader returning an ArrayDataset.
LOADERS = {
    DigitsData: load_digits,
    GaussianMixtureData: load_gaussian_mixture,
    TeacherStudentData: load_teacher_student,
    TFDSImageData: load_tfds_images,
}


def load(config) -> ArrayDataset:
  """Loads the dataset a data config names (cached per config)."""
  try:
    loader = LOADERS[type(config)]
  except KeyError:
    raise ValueError(f"{config!r} is not a data config; expected one of "
                     f"{[c.__name__ for c in LOADERS]}.") from None
  return loader(config)


__all__ = [
    "ArrayDataset",
    "DatasetNotPreparedError",
    "DigitsData",
    "GaussianMixtureData",
    "LOADERS",
    "TFDSImageData",
    "TeacherStudentData",
    "batch_sampler",
    "fixed_batch",
    "load",
]
