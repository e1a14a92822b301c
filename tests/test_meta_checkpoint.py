"""Meta-training checkpoints: round trip, mismatched runs and corrupt files fail clearly."""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest

import metaopt
import tasks
from metaopt.meta import MetaConfig, MetaTrainer
from metaopt.meta import checkpointing as ckpt
from metaopt.meta import run

CONFIG = MetaConfig(tasks=(tasks.config_to_json(tasks.QuadraticConfig(dim=4)),),
                    hidden_size=2, num_pairs=2, num_blind_pairs=1, truncation_length=5,
                    horizon=20, min_horizon=5, validation_every=0)


def _metadata(trainer):
  return ckpt.run_metadata(trainer.config, trainer.lo_config,
                           [t.name for t in trainer.tasks])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A checkpoint of the initial state (no outer step: nothing heavy to compile)."""
  directory = tmp_path_factory.mktemp("ckpt")
  trainer = MetaTrainer(CONFIG)
  state = trainer.init()
  manager = ckpt.checkpoint_manager(directory)
  ckpt.save(manager, 0, state, _metadata(trainer))
  manager.wait_until_finished()
  return directory, trainer, state


def test_round_trip_restores_every_array(saved):
  directory, trainer, state = saved
  manager = ckpt.checkpoint_manager(directory)
  restored = ckpt.restore(manager, 0, trainer.abstract_state(), _metadata(trainer))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding.is_equivalent_to(b.sharding, np.ndim(a))
  assert ckpt.config_from_checkpoint(directory) == CONFIG


def test_a_different_run_is_refused_by_name(saved):
  directory, _, _ = saved
  other = MetaTrainer(CONFIG.replace(num_pairs=4, sigma=0.05))
  manager = ckpt.checkpoint_manager(directory)
  with pytest.raises(ckpt.CheckpointError, match=r"config\.num_pairs.*\n.*config\.sigma"):
    ckpt.restore(manager, 0, other.abstract_state(), _metadata(other))
  # Same config, but a target whose shapes differ (e.g. a changed task): named too.
  with pytest.raises(ckpt.CheckpointError, match="does not match this run's state"):
    ckpt.restore(manager, 0, other.abstract_state(), _metadata(MetaTrainer(CONFIG)))


def test_resumable_fields_may_change(saved):
  directory, trainer, _ = saved
  longer = CONFIG.replace(outer_steps=5000, log_every=1)
  assert ckpt.fields_differ(longer, CONFIG) == []
  manager = ckpt.checkpoint_manager(directory)
  meta = ckpt.run_metadata(longer, trainer.lo_config, [t.name for t in trainer.tasks])
  ckpt.restore(manager, 0, trainer.abstract_state(), meta)


def _copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
  import shutil
  shutil.copytree(src, dst)
  return dst


def test_corrupt_checkpoints_raise_checkpoint_error(saved, tmp_path):
  directory, trainer, _ = saved
  # Garbled array data.
  bad = _copy(directory, tmp_path / "garbled")
  files = [p for p in (bad / "0" / "state").rglob("*") if p.is_file() and
           p.stat().st_size > 0 and "metadata" not in p.name]
  assert files
  for p in files:
    p.write_bytes(b"\0garbage" * 8)
  with pytest.raises(ckpt.CheckpointError, match="corrupt"):
    ckpt.restore(ckpt.checkpoint_manager(bad), 0, trainer.abstract_state(),
                 _metadata(trainer))
  # Unreadable config item.
  bad = _copy(directory, tmp_path / "noconfig")
  for p in (bad / "0" / "config").rglob("*"):
    if p.is_file():
      p.write_text("{not json")
  with pytest.raises(ckpt.CheckpointError, match="unreadable"):
    ckpt.restore(ckpt.checkpoint_manager(bad), 0, trainer.abstract_state(),
                 _metadata(trainer))


def test_meta_train_refuses_to_overwrite_and_finds_newest_run(saved, tmp_path):
  directory, _, _ = saved
  out = tmp_path / "runs" / "a"
  (out / run.CHECKPOINT_DIR).parent.mkdir(parents=True)
  _copy(directory, out / run.CHECKPOINT_DIR)
  with pytest.raises(FileExistsError, match="--resume"):
    run.meta_train(CONFIG, out, progress=False)
  assert run.newest_run(tmp_path / "runs") == out
  assert run.newest_run(out) == out
  assert run.newest_run(tmp_path / "nothing") is None


def test_export_checkpoint_writes_a_loadable_artifact(saved, tmp_path):
  directory, trainer, state = saved
  out = tmp_path / "run"
  out.mkdir()
  _copy(directory, out / run.CHECKPOINT_DIR)
  lo = run.export_checkpoint(out, 0, tmp_path / "artifact")
  loaded = metaopt.load(tmp_path / "artifact")
  assert loaded.config == trainer.lo_config == lo.config
  for k, v in state.theta.items():
    np.testing.assert_array_equal(loaded.theta[k], np.asarray(v))
  with pytest.raises(ValueError, match=r"no checkpoint at outer step 7; it has \[0\]"):
    run.export_checkpoint(out, 7, tmp_path / "other")


def test_export_to_a_directory_that_is_not_an_artifact_deletes_nothing(saved, tmp_path,
                                                                       capsys):
  import meta_train  # pylint: disable=g-import-not-at-top
  directory, _, _ = saved
  out = tmp_path / "run"
  out.mkdir()
  _copy(directory, out / run.CHECKPOINT_DIR)
  dest = tmp_path / "d"
  dest.mkdir()
  (dest / "thesis.tex").write_text("my thesis")
  assert meta_train.main(["--out", str(out), "--export", "0", "--export-to", str(dest)]) == 2
  err = capsys.readouterr().err
  assert "not a metaopt learned-optimizer artifact" in err and len(err.splitlines()) == 1
  assert sorted(p.name for p in dest.iterdir()) == ["thesis.tex"]
  assert (dest / "thesis.tex").read_text() == "my thesis"
  # An artifact is replaced.
  assert meta_train.main(["--out", str(out), "--export", "0", "--export-to",
                          str(tmp_path / "a")]) == 0
  assert meta_train.main(["--out", str(out), "--export", "0", "--export-to",
                          str(tmp_path / "a")]) == 0
  metaopt.load(tmp_path / "a")
