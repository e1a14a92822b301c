"""Learned-optimizer artifacts: bit-exact round trips and clear errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metaopt
from metaopt import checkpoint
from metaopt.lopt import FEATURE_NAMES, LOConfig, LearnedOptimizer


def _lo():
  return LearnedOptimizer.random(jax.random.key(3), LOConfig(hidden_size=4),
                                 output_scale=0.1)


def test_save_load_round_trip_is_bit_exact(tmp_path):
  lo = _lo()
  path = checkpoint.save(lo, tmp_path / "lo", meta_training={"steps": 7})
  loaded = metaopt.load(path)
  assert loaded.config == lo.config
  for k in lo.theta:
    np.testing.assert_array_equal(np.asarray(loaded.theta[k]), np.asarray(lo.theta[k]))
    assert loaded.theta[k].dtype == jnp.float32
  assert loaded.metadata["meta_training"] == {"steps": 7}
  # The loaded optimizer gives the same updates.
  params = {"w": jnp.ones((3, 4))}
  grads = {"w": jnp.arange(12.0).reshape(3, 4)}
  outs = []
  for opt in (lo.as_optax(), loaded.as_optax()):
    outs.append(opt.update(grads, opt.init(params), params)[0]["w"])
  np.testing.assert_array_equal(outs[0], outs[1])


def test_save_refuses_to_overwrite_and_leaves_no_partial_dirs(tmp_path):
  path = checkpoint.save(_lo(), tmp_path / "lo")
  with pytest.raises(FileExistsError):
    checkpoint.save(_lo(), path)
  (path / "MODEL_CARD.md").write_text("# card")
  (path / "stale.txt").write_text("old")
  checkpoint.save(_lo(), path, overwrite=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["lo"]
  # Overwriting keeps the model card and nothing else from before.
  assert (path / "MODEL_CARD.md").read_text() == "# card"
  assert not (path / "stale.txt").exists()


def _rewrite_metadata(path, **changes):
  meta_file = path / checkpoint.METADATA_FILE
  meta = json.loads(meta_file.read_text())
  meta.update(changes)
  meta_file.write_text(json.dumps(meta))


def test_tampered_feature_list_is_rejected_naming_the_difference(tmp_path):
  path = checkpoint.save(_lo(), tmp_path / "lo")
  features = [f for f in FEATURE_NAMES if f != "grams"] + ["mystery"]
  _rewrite_metadata(path, features=features)
  with pytest.raises(checkpoint.ArtifactError, match=r"missing \['grams'\].*\['mystery'\]"):
    metaopt.load(path)


def test_format_version_and_shape_mismatch_are_clear_errors(tmp_path):
  path = checkpoint.save(_lo(), tmp_path / "lo")
  _rewrite_metadata(path, format_version=99)
  with pytest.raises(checkpoint.ArtifactError, match="format_version=99"):
    metaopt.load(path)
  path2 = checkpoint.save(_lo(), tmp_path / "lo2")
  meta = json.loads((path2 / checkpoint.METADATA_FILE).read_text())
  meta["config"]["hidden_size"] = 8
  (path2 / checkpoint.METADATA_FILE).write_text(json.dumps(meta))
  with pytest.raises(checkpoint.ArtifactError, match="theta_shapes"):
    metaopt.load(path2)


def test_not_an_artifact(tmp_path):
  with pytest.raises(checkpoint.ArtifactError, match="not a metaopt learned-optimizer"):
    metaopt.load(tmp_path)
  (tmp_path / "metadata.json").write_text("{not json")
  (tmp_path / "theta").mkdir()
  with pytest.raises(checkpoint.ArtifactError, match="not valid JSON"):
    metaopt.load(tmp_path)
