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


def test_saving_a_step_already_on_disk_is_a_no_op(saved, tmp_path):
  """Issue 24 item 2: a stop right after a periodic checkpoint saved the same step again
  and orbax raised StepAlreadyExistsError (exit 1 instead of 143)."""
  directory, trainer, state = saved
  copy = _copy(directory, tmp_path / "ckpt")
  manager = ckpt.checkpoint_manager(copy)
  assert ckpt.save(manager, 0, state, _metadata(trainer)) is False
  manager.wait_until_finished()
  assert manager.all_steps() == [0]


def test_export_to_a_full_disk_is_one_line_exit_74(saved, tmp_path, capsys, monkeypatch):
  """Issue 24 item 11: --export caught ValueError but not OSError (a traceback)."""
  import errno  # pylint: disable=g-import-not-at-top
  import meta_train  # pylint: disable=g-import-not-at-top
  directory, _, _ = saved
  out = tmp_path / "run"
  out.mkdir()
  _copy(directory, out / run.CHECKPOINT_DIR)
  dest = tmp_path / "artifact"

  def full(lo, path, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))

  monkeypatch.setattr(metaopt.checkpoint, "save", full)
  assert meta_train.main(["--out", str(out), "--export", "0", "--export-to",
                          str(dest)]) == 74
  err = capsys.readouterr().err
  assert err == (f"--export: error: cannot write {dest}: No space left on device (ENOSPC); "
                 "files written before are intact (a run continues with --resume from "
                 "its newest checkpoint)\n")


TINY = CONFIG.replace(num_blind_pairs=0, outer_steps=2, checkpoint_every=1,
                      keep_checkpoints=5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A run with checkpoints at steps 1 and 2, full and light."""
  root = tmp_path_factory.mktemp("runs")
  full = run.meta_train(TINY, root / "full", progress=False)
  light = run.meta_train(TINY.replace(checkpoint_populations=False), root / "light",
                         progress=False)
  return root, full, light


def _delete_arrays(step_dir: pathlib.Path) -> None:
  for p in (step_dir / "state").rglob("*"):
    if p.is_file() and "metadata" not in p.name:
      p.unlink()


def test_resume_falls_back_to_the_newest_intact_checkpoint(trained, tmp_path, capsys):
  """Issue 24 item 7: the newest checkpoint's arrays deleted, --resume exited 1 with a
  CheckpointError traceback."""
  import meta_train  # pylint: disable=g-import-not-at-top
  root, _, _ = trained
  out = _copy(root / "full", tmp_path / "run")
  _delete_arrays(out / run.CHECKPOINT_DIR / "2")
  assert meta_train.main(["--resume", "--out", str(out), "--no-fallback",
                          "--no-progress", "--compile-cache", ""]) == 2
  err = capsys.readouterr().err
  assert err.startswith("--resume: checkpoint ") and "corrupt or incomplete" in err, err
  assert len(err.splitlines()) == 1 and (out / run.CHECKPOINT_DIR / "2").is_dir()
  assert meta_train.main(["--resume", "--out", str(out), "--set", "outer_steps=3",
                          "--no-progress", "--compile-cache", ""]) == 0
  captured = capsys.readouterr()
  (line,) = captured.err.splitlines()
  assert line.startswith("--resume: checkpoint step 2 is corrupt or incomplete (") and (
      f"resuming from step 1, the newest intact one (skipped steps [2] moved to "
      f"{out.absolute() / run.CORRUPT_DIR})") in line, line
  assert "done:" in captured.out
  assert ckpt.checkpoint_manager(out / run.CHECKPOINT_DIR).all_steps() == [1, 2, 3]
  steps = [r["step"] for r in metaopt.meta.logging.read_metrics(out) if r["kind"] == "train"]
  assert steps == [1, 2, 3]


def test_light_checkpoints_hold_no_populations_and_resume_fresh_episodes(trained):
  root, full, light = trained
  # What orbax stored, read from its metadata (file sizes are dominated by metadata at
  # this size and vary with timestamps: that comparison was flaky).
  stored = [ckpt.checkpoint_manager(r.out / run.CHECKPOINT_DIR).item_metadata(2)["state"]
            for r in (full, light)]
  nbytes = lambda tree: sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                            for x in jax.tree.leaves(tree))
  assert sorted(stored[0].keys()) == sorted((*ckpt.LIGHT_FIELDS, "populations"))
  assert sorted(stored[1].keys()) == sorted(ckpt.LIGHT_FIELDS)
  populations = nbytes(stored[0]["populations"])
  assert populations > 0 and nbytes(stored[1]) == nbytes(stored[0]) - populations
  light_dir = light.out / run.CHECKPOINT_DIR / "2"
  trainer = MetaTrainer(TINY.replace(checkpoint_populations=False))
  manager = ckpt.checkpoint_manager(light_dir.parent)
  meta = _metadata(trainer)
  with pytest.raises(ckpt.CheckpointError, match="light checkpoint"):
    ckpt.restore(manager, 2, trainer.abstract_state(), meta)
  fresh = trainer.init()
  state = ckpt.restore(manager, 2, trainer.abstract_state(), meta,
                       init_populations=lambda: fresh.populations)
  assert int(state.step) == 2
  for k, v in light.state.theta.items():
    np.testing.assert_array_equal(np.asarray(state.theta[k]), np.asarray(v))
  for a, b in zip(jax.tree.leaves(state.populations), jax.tree.leaves(fresh.populations)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The run continues from it (a full run's config may switch to light and back).
  resumed = run.meta_train(TINY.replace(checkpoint_populations=False, outer_steps=3),
                           light.out, resume=True, progress=False)
  assert resumed.summary["step"] == 3 and int(resumed.state.step) == 3


@pytest.mark.parametrize("name", ["lease", "release_mup", "release_sp"])
def test_light_checkpoints_of_the_release_presets_are_under_16_mib(name):
  """What leaves a leased GPU: theta, the outer optimizer state, key and step."""
  from metaopt.meta import config as config_lib, outer  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(name)
  if name == "lease":
    assert not config.checkpoint_populations and config.num_pairs >= 16
  theta = outer.warm_start(config).theta
  opt_state = jax.eval_shape(outer.outer_optimizer(config, theta).init, theta)
  nbytes = sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves((theta, opt_state)))
  assert nbytes + 16 <= 16 * 2**20, nbytes


def test_a_resume_drops_a_log_line_cut_short_by_a_killed_process(tmp_path):
  """The watchdog's os._exit may cut a metrics.jsonl line in half; --resume drops it
  (json.loads of it was a traceback)."""
  log = metaopt.meta.logging.MetricsLog(tmp_path / "metrics.jsonl")
  for step in (1, 2, 3):
    log.write({"kind": "train", "step": step})
  with log.path.open("a") as f:
    f.write('{"kind": "train", "st')
  log.truncate_after(2)
  assert [r["step"] for r in metaopt.meta.logging.read_metrics(log.path)] == [1, 2]
