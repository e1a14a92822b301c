"""Learned-optimizer artifacts: bit-exact round trips and clear errors."""

import errno
import json
import os
import pathlib
import signal
import subprocess
import sys

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


def test_save_writes_theta_with_the_given_checkpointer(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  saved_to = []

  class Recording(ocp.PyTreeCheckpointer):

    def save(self, directory, *args, **kwargs):
      saved_to.append(pathlib.Path(directory).name)
      return super().save(directory, *args, **kwargs)

  lo = _lo()
  path = checkpoint.save(lo, tmp_path / "lo", checkpointer=Recording())
  assert saved_to == [checkpoint.THETA_DIR]
  np.testing.assert_array_equal(np.asarray(metaopt.load(path).theta["w1"]),
                                np.asarray(lo.theta["w1"]))


def test_save_refuses_to_overwrite_and_leaves_no_partial_dirs(tmp_path):
  path = checkpoint.save(_lo(), tmp_path / "lo")
  with pytest.raises(FileExistsError):
    checkpoint.save(_lo(), path)
  (path / "MODEL_CARD.md").write_text("# card")
  new = _lo().with_theta(jax.tree.map(lambda a: a + 1, _lo().theta))
  checkpoint.save(new, path, overwrite=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["lo"]
  # Overwriting keeps the model card and replaces the rest.
  assert (path / "MODEL_CARD.md").read_text() == "# card"
  np.testing.assert_array_equal(metaopt.load(path).theta["w1"], new.theta["w1"])


@pytest.mark.parametrize("kind", ["file", "directory", "artifact_with_other_files",
                                  "json_list_metadata", "symlink"])
def test_overwrite_refuses_anything_but_an_artifact_and_deletes_nothing(tmp_path, kind):
  target = tmp_path / "target"
  if kind == "file":
    target.write_text("my thesis")
  elif kind == "directory":
    target.mkdir()
    (target / "thesis.tex").write_text("my thesis")
  elif kind == "artifact_with_other_files":
    checkpoint.save(_lo(), target)
    (target / "thesis.tex").write_text("my thesis")
  elif kind == "json_list_metadata":  # looks like one, but metadata.json is not ours
    (target / "theta").mkdir(parents=True)
    (target / "metadata.json").write_text("[1, 2]")
  else:
    checkpoint.save(_lo(), tmp_path / "real")
    target.symlink_to(tmp_path / "real")
  before = sorted(str(p) for p in tmp_path.rglob("*"))
  with pytest.raises(FileExistsError, match=r"target.*refusing to overwrite") as err:
    checkpoint.save(_lo(), target, overwrite=True)
  assert "\n" not in str(err.value)
  assert sorted(str(p) for p in tmp_path.rglob("*")) == before
  if kind in ("file", "directory", "artifact_with_other_files"):
    thesis = target if kind == "file" else target / "thesis.tex"
    assert thesis.read_text() == "my thesis"


def _theta_w1(path):
  return np.asarray(metaopt.load(path).theta["w1"])


@pytest.mark.parametrize("where", ["writing_theta", "swapping"])
def test_failed_overwrite_leaves_the_old_artifact_intact(tmp_path, monkeypatch, where):
  old = _lo()
  path = checkpoint.save(old, tmp_path / "lo")
  (path / "MODEL_CARD.md").write_text("# card")

  def fail(*args, **kwargs):
    raise RuntimeError(f"simulated failure while {where}")

  if where == "writing_theta":
    monkeypatch.setattr(checkpoint, "_checkpointer",
                        lambda: type("Broken", (), {"save": staticmethod(fail)})())
  else:
    monkeypatch.setattr(checkpoint, "_swap", fail)
  new = old.with_theta(jax.tree.map(lambda a: a + 1, old.theta))
  with pytest.raises(RuntimeError, match="simulated"):
    checkpoint.save(new, path, overwrite=True)
  monkeypatch.undo()
  np.testing.assert_array_equal(_theta_w1(path), np.asarray(old.theta["w1"]))
  assert (path / "MODEL_CARD.md").read_text() == "# card"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["lo"]  # temp dir removed


_KILLED_SAVE = '''
import os, signal, sys
import jax
import metaopt
from metaopt import checkpoint
real_swap = checkpoint._swap
def swap_then_die(new, old):
  if sys.argv[2] == "before":
    os.kill(os.getpid(), signal.SIGKILL)
  real_swap(new, old)
  os.kill(os.getpid(), signal.SIGKILL)  # after the swap, before the old one is removed
checkpoint._swap = swap_then_die
lo = metaopt.load(sys.argv[1])
checkpoint.save(lo.with_theta(jax.tree.map(lambda a: a + 1, lo.theta)), sys.argv[1],
                overwrite=True)
'''


@pytest.mark.parametrize("when", ["before", "after"])
def test_save_killed_midway_leaves_one_complete_artifact(tmp_path, when):
  """SIGKILL right before or right after the swap: the path holds a complete artifact,
  the old one or the new one, and loads."""
  old = _lo()
  path = checkpoint.save(old, tmp_path / "lo")
  repo = pathlib.Path(__file__).resolve().parents[1]
  proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(path), when], cwd=repo,
                        env={**os.environ, "PYTHONPATH": str(repo), "JAX_PLATFORMS": "cpu"},
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  expected = old.theta["w1"] + (0 if when == "before" else 1)
  np.testing.assert_array_equal(_theta_w1(path), np.asarray(expected))


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


@pytest.mark.parametrize("text, match", [
    ("[1, 2, 3]", "holds a JSON list; expected an object"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    ('{"format_version": true}', "format_version=True"),
])
def test_malformed_metadata_documents_are_clear_errors(tmp_path, text, match):
  path = checkpoint.save(_lo(), tmp_path / "lo")
  (path / checkpoint.METADATA_FILE).write_text(text)
  with pytest.raises(checkpoint.ArtifactError, match=match):
    metaopt.load(path)


@pytest.mark.parametrize("field, value, match", [
    ("step_mult", float("nan"), "step_mult=nan; expected a finite number"),
    ("step_mult", -1.0, r"step_mult=-1.0 is out of range; expected a value in \[0, inf\)"),
    ("max_log_step", float("inf"), "max_log_step=inf; expected a finite number"),
    ("max_log_step", 0.0,
     r"max_log_step=0.0 is out of range; expected a value in \(0, inf\)"),
    ("ademamix_alpha", -5.0,
     r"ademamix_alpha=-5.0 is out of range; expected a value in \[0, inf\)"),
    ("ademamix_alpha", "5", "ademamix_alpha='5'; expected a finite number"),
    ("mup", "no", "mup='no'; expected True or False"),
    ("hidden_size", 4.0, "hidden_size=4.0; expected a positive int"),
    ("momentum_decays", [0.9, 0.99], "momentum_decays=.*expected 3 decays"),
    ("horizon_decay", ["linear"], "horizon_decay=\\['linear'\\]"),
])
def test_out_of_range_or_mistyped_config_is_rejected_on_load_and_construction(
    tmp_path, field, value, match):
  path = checkpoint.save(_lo(), tmp_path / "lo")
  meta = json.loads((path / checkpoint.METADATA_FILE).read_text())
  meta["config"][field] = value
  # allow_nan: Python's json writes NaN/Infinity, which json.loads reads back.
  (path / checkpoint.METADATA_FILE).write_text(json.dumps(meta))
  with pytest.raises(checkpoint.ArtifactError, match=match):
    metaopt.load(path)
  with pytest.raises(ValueError, match=match):  # the same check as construction
    LOConfig.from_dict(meta["config"])


def _bad_theta(lo, kind):
  theta = dict(lo.theta)
  if kind == "nan":
    theta["w1"] = theta["w1"].at[1, 2].set(jnp.nan)
  elif kind == "beyond_float32":  # finite in float64, inf once stored as float32
    theta["b2"] = np.full(theta["b2"].shape, 1e39)
  elif kind == "wrong_shape":
    theta["w1"] = jnp.zeros((theta["w1"].shape[0] + 1, theta["w1"].shape[1]))
  elif kind == "missing_entry":
    del theta["b1"]
  else:
    theta["extra"] = jnp.zeros(3)
  return lo.with_theta(theta)


@pytest.mark.parametrize("kind, match", [
    ("nan", r"theta\['w1'\] has 1 non-finite"),
    ("beyond_float32", r"theta\['b2'\] has 2 non-finite"),
    ("wrong_shape", r"theta\['w1'\] has shape \(28, 4\); the config's is \(27, 4\)"),
    ("missing_entry", r"theta has entries \['b2', 'log_lr'.*config's are \['b1'"),
    ("extra_entry", r"theta has entries .*'extra'"),
])
def test_save_refuses_what_load_would_refuse_and_keeps_the_old_artifact(
    tmp_path, kind, match):
  old = _lo()
  assert old.theta["w1"].shape == (27, 4) and old.theta["b2"].shape == (2,)
  bad = _bad_theta(old, kind)
  with pytest.raises(checkpoint.ArtifactError, match=match) as err:
    checkpoint.save(bad, tmp_path / "new")
  assert "\n" not in str(err.value) and "new" in str(err.value)
  assert not list(tmp_path.iterdir())  # nothing written
  path = checkpoint.save(old, tmp_path / "lo")
  with pytest.raises(checkpoint.ArtifactError, match=match):
    checkpoint.save(bad, path, overwrite=True)
  np.testing.assert_array_equal(_theta_w1(path), np.asarray(old.theta["w1"]))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["lo"]


def test_save_refuses_metadata_that_load_would_refuse(tmp_path):
  with pytest.raises(checkpoint.ArtifactError, match="'meta_training' is a JSON list"):
    checkpoint.save(_lo(), tmp_path / "lo", meta_training=[1, 2])
  with pytest.raises(checkpoint.ArtifactError, match="metadata is not JSON"):
    checkpoint.save(_lo(), tmp_path / "lo", meta_training={"f": object()})
  assert not list(tmp_path.iterdir())


@pytest.fixture(name="umask")
def _umask(request):
  old = os.umask(request.param)
  yield request.param
  os.umask(old)


@pytest.mark.parametrize("umask", [0o022, 0o027], indirect=True)
def test_artifacts_get_the_umask_permissions(tmp_path, umask):
  lo = _lo()
  path = checkpoint.save(lo, tmp_path / "lo")
  modes = {}
  for overwrite in (False, True):
    if overwrite:
      checkpoint.save(lo.with_theta(jax.tree.map(lambda a: a + 1, lo.theta)), path,
                      overwrite=True)
    entries = [path, *path.rglob("*")]
    assert len(entries) > 3
    for p in entries:
      want = (0o777 if p.is_dir() else 0o666) & ~umask
      modes[(overwrite, str(p.relative_to(tmp_path)))] = (
          oct(p.stat().st_mode & 0o777), oct(want))
  wrong = {k: v for k, v in modes.items() if v[0] != v[1]}
  assert not wrong, f"(got, wanted) modes: {wrong}"


@pytest.mark.parametrize("overwrite", [False, True])
def test_disk_full_while_writing_metadata_is_one_line_write_error(
    tmp_path, monkeypatch, overwrite):
  old = _lo()
  path = tmp_path / "lo"
  if overwrite:
    checkpoint.save(old, path)

  def full(*args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(checkpoint, "_write_metadata", full)
  with pytest.raises(checkpoint.ArtifactWriteError) as err:
    checkpoint.save(old.with_theta(jax.tree.map(lambda a: a + 1, old.theta)), path,
                    overwrite=overwrite)
  assert isinstance(err.value, OSError) and err.value.errno == errno.ENOSPC
  message = str(err.value)
  assert "\n" not in message and str(path) in message and "ENOSPC" in message
  assert ("unchanged" if overwrite else "nothing was written") in message
  monkeypatch.undo()
  assert sorted(p.name for p in tmp_path.iterdir()) == (["lo"] if overwrite else [])
  if overwrite:
    np.testing.assert_array_equal(_theta_w1(path), np.asarray(old.theta["w1"]))


def test_file_size_limit_while_writing_theta_is_a_write_error(tmp_path):
  """A real failed write inside orbax/tensorstore (which reports it as a ValueError):
  RLIMIT_FSIZE makes every write past 100 bytes fail with EFBIG."""
  resource = pytest.importorskip("resource")
  old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (100, old_limit[1]))
  try:
    with pytest.raises(checkpoint.ArtifactWriteError) as err:
      checkpoint.save(_lo(), tmp_path / "lo")
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
    signal.signal(signal.SIGXFSZ, old_handler)
  assert err.value.errno == errno.EFBIG
  assert "\n" not in str(err.value) and str(tmp_path / "lo") in str(err.value)
  assert not list(tmp_path.iterdir())
