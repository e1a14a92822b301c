"""Data of the tasks package: digits, generated data, stdlib text corpus, TFDS adapter."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tasks import data as data_lib
from tasks.data import digits
from tasks.data import synthetic
from tasks.data import text
from tasks.data import tfds as tfds_adapter

# SHA-256 of Lib/email/architecture.rst, per Python version it was checked on (3.11:
# CPython 3.11.7). The file has not changed for years (CPython main at commit 3c33563 has
# the same 9561 characters); other versions are compared with the 3.11 hash, so a change
# anywhere is detected -- then record that version's hash here.
CORPUS_SHA256 = {
    (3, 11): "f2b2ba7497fd02d13abcfc2a98099283a94b09e8b4f2c1c822ecacde3bec3eae",
}


def test_corpus_hash_detects_a_change():
  version = sys.version_info[:2]
  expected = CORPUS_SHA256.get(version, CORPUS_SHA256[(3, 11)])
  assert text.corpus_sha256() == expected, (
      f"email/architecture.rst differs on Python {version}: record its hash here if "
      "the change is expected (the LM tasks' data changed).")


def test_corpus_tokens_and_windows():
  corpus = text.load_corpus()
  assert corpus.vocab_size == 70
  assert len(corpus.train_tokens) + len(corpus.test_tokens) == 9561
  assert corpus.decode(corpus.train_tokens[:33]) == ":mod:`email` Package Architecture"
  sample = jax.jit(text.window_sampler(corpus, batch_size=4, context=16), static_argnums=1)
  batch = sample(jax.random.key(0), "test")
  assert batch["x"].shape == batch["y"].shape == (4, 16)
  assert batch["x"].dtype == jnp.int32
  np.testing.assert_array_equal(batch["x"][:, 1:], batch["y"][:, :-1])
  assert int(batch["x"].max()) < corpus.vocab_size


def test_digits_split_is_fixed_and_documented():
  data = digits.load_digits()
  train, test = digits.split_indices()
  assert len(train) == 1437 and len(test) == 360
  assert sorted(np.concatenate([train, test]).tolist()) == list(range(1797))
  np.testing.assert_array_equal(test[:5], [1442, 455, 584, 147, 160])  # RandomState(0)
  assert data.train_x.shape == (1437, 8, 8, 1) and data.train_x.dtype == np.float32
  assert data.test_y.shape == (360,) and data.test_y.dtype == np.int32
  assert abs(float(data.train_x.mean())) < 1e-4 and abs(float(data.train_x.std()) - 1) < 1e-3
  assert set(data.train_y.tolist()) == set(range(10))


def test_generated_data_is_deterministic_in_the_config():
  cfg = synthetic.GaussianMixtureData(num_classes=4, dim=8, num_train=64, num_test=16)
  a = synthetic.load_gaussian_mixture(cfg)
  b = synthetic.load_gaussian_mixture.__wrapped__(cfg)  # bypass the cache
  np.testing.assert_array_equal(a.train_x, b.train_x)
  assert a.train_x.shape == (64, 8) and a.num_classes == 4
  c = synthetic.load_gaussian_mixture(
      synthetic.GaussianMixtureData(num_classes=4, dim=8, num_train=64, num_test=16, seed=1))
  assert not np.array_equal(a.train_x, c.train_x)
  ts = synthetic.load_teacher_student(synthetic.TeacherStudentData(num_train=32, num_test=8))
  assert ts.train_x.shape == (32, 32) and ts.train_y.shape == (32, 4) and ts.num_classes == 0


def test_quadratic_spectrum():
  h, q, x_star = synthetic.quadratic_problem(16, 1000.0, rotate=True, seed=0)
  np.testing.assert_allclose([h.min(), h.max()], [1e-3, 1.0], rtol=1e-5)
  np.testing.assert_allclose(q @ q.T, np.eye(16), atol=1e-5)
  assert x_star.shape == (16,)


def test_batch_sampler_is_jittable_and_vmappable():
  data = digits.load_digits()
  sample = data_lib.batch_sampler(data, batch_size=32)
  batch = jax.jit(jax.vmap(sample))(jax.random.split(jax.random.key(0), 8))
  assert batch["x"].shape == (8, 32, 8, 8, 1) and batch["y"].shape == (8, 32)
  assert not np.array_equal(batch["y"][0], batch["y"][1])  # data order follows the key
  with pytest.raises(ValueError, match="split"):
    sample(jax.random.key(0), "validation")


# --- TFDS adapter (optional extra) ------------------------------------------------------


def _fake_prepared(data_dir, name, version="1.0.0"):
  """The file layout tfds.data_source reads; mock_data supplies the records."""
  root = data_dir / name / version
  root.mkdir(parents=True)
  for split in ("train", "test"):
    (root / f"{name}-{split}.array_record-00000-of-00001").touch()


def test_tfds_missing_data_raises_the_documented_error(tmp_path):
  config = data_lib.TFDSImageData("fashion_mnist", str(tmp_path), image_size=8)
  with pytest.raises(data_lib.DatasetNotPreparedError) as err:
    data_lib.load(config)
  message = str(err.value)
  for part in ("'fashion_mnist'", str(tmp_path), "array_record", "never downloads",
               "tfds build fashion_mnist"):
    assert part in message


def test_tfds_tfrecord_only_data_is_named_in_the_error(tmp_path):
  root = tmp_path / "mnist" / "3.0.1"
  root.mkdir(parents=True)
  (root / "mnist-train.tfrecord-00000-of-00001").touch()
  with pytest.raises(data_lib.DatasetNotPreparedError, match="TFRecord"):
    tfds_adapter.check_prepared("mnist", str(tmp_path), "train")


@pytest.mark.parametrize("name,size,gray,channels", [
    ("mnist", 8, False, 1),
    ("fashion_mnist", 16, False, 1),
    ("cifar10", 32, False, 3),
    ("cifar10", 16, True, 1),
])
def test_tfds_adapter_with_mock_data(tmp_path, name, size, gray, channels):
  tfds = pytest.importorskip("tensorflow_datasets")
  _fake_prepared(tmp_path, name)
  config = data_lib.TFDSImageData(name, str(tmp_path), image_size=size, grayscale=gray)
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    data = data_lib.load(config)
  assert data.train_x.shape == (6, size, size, channels) == (6, *config.input_shape)
  assert data.train_x.dtype == np.float32 and data.train_y.dtype == np.int32
  assert data.test_x.shape == (6, size, size, channels)
  assert np.all((data.train_y >= 0) & (data.train_y < 10)) and data.num_classes == 10
  batch = data_lib.batch_sampler(data, 4)(jax.random.key(0))
  assert batch["x"].shape == (4, size, size, channels) and batch["y"].dtype == jnp.int32


def test_importing_tasks_imports_neither_tfds_nor_tensorflow():
  code = ("import sys, tasks; tasks.get_suite('heldout'); "
          "assert 'tensorflow_datasets' not in sys.modules; "
          "assert 'tensorflow' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
