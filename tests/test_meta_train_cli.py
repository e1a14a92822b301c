"""meta_train.py as a user meets it: preemption, resuming, bad configs and --out.

SIGTERM (how schedulers preempt a job) is handled like Ctrl-C: the state is
checkpointed, one line says how to continue, the exit status is 128 + the signal.
Configuration mistakes end in one line naming the value and exit 2, never a traceback.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

import meta_train
from metaopt.meta import run

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 240
# The tiny quadratic run of the distributed tests: compiles in seconds.
CONFIG = {"tasks": [{"__type__": "QuadraticConfig", "batch_size": 4,
                     "condition_number": 10.0, "dim": 8, "noise_std": 0.1, "rotate": True,
                     "seed": 0}],
          "hidden_size": 2, "num_pairs": 2, "num_blind_pairs": 0, "truncation_length": 5,
          "horizon": 20, "min_horizon": 5, "outer_learning_rate": 0.05, "sigma": 0.02,
          "validation_every": 0, "checkpoint_every": 1000, "log_every": 1,
          "outer_steps": 100000}


def _config(tmp_path, **changes) -> pathlib.Path:
  path = tmp_path / "tiny.json"
  path.write_text(json.dumps({**CONFIG, **changes}))
  return path


def _steps_logged(out: pathlib.Path) -> int:
  path = out / "metrics.jsonl"
  if not path.exists():
    return 0
  return max((json.loads(l)["step"] for l in path.read_text().splitlines()
              if '"train"' in l), default=0)


def _ignore_sigint():
  """Start the child as a shell starts a background job: SIGINT ignored (SIG_IGN is
  inherited across exec, and Python then installs no KeyboardInterrupt handler).
  meta_train.py must handle it anyway; a test runner started with `&` did this by
  accident once, and SIGINT was silently ignored."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_checkpoints_and_exits_with_one_clean_line(tmp_path, sig, code):
  out = tmp_path / "run"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
  env.pop("XLA_FLAGS", None)
  log = tmp_path / "log.txt"
  proc = subprocess.Popen([sys.executable, REPO / "meta_train.py", "--config",
                           _config(tmp_path), "--out", out, "--no-progress",
                           "--compile-cache", ""], cwd=REPO, env=env,
                          stdout=log.open("w"), stderr=subprocess.STDOUT,
                          preexec_fn=_ignore_sigint)
  deadline = time.time() + TIMEOUT_S
  while _steps_logged(out) < 2:
    assert proc.poll() is None, log.read_text()[-3000:]
    assert time.time() < deadline, "the run never reached step 2"
    time.sleep(0.05)
  proc.send_signal(sig)
  assert proc.wait(timeout=TIMEOUT_S) == code, log.read_text()[-3000:]
  text = log.read_text()
  assert "Traceback" not in text, text[-3000:]
  (line,) = [l for l in text.splitlines() if "interrupted" in l]
  name = "SIGTERM" if sig == signal.SIGTERM else "SIGINT"
  assert line.startswith(f"interrupted by {name}: saved step ") and "--resume --out" in line
  saved = int(line.split("saved step ")[1].split(";")[0])
  assert saved >= 2 and (out / run.CHECKPOINT_DIR / str(saved)).is_dir()
  assert run.newest_run(out) == out


def _fake_run(path: pathlib.Path, steps=()) -> pathlib.Path:
  """The files a run leaves: config.json, checkpoints/ with finished step dirs."""
  (path / run.CHECKPOINT_DIR).mkdir(parents=True)
  (path / run.CONFIG_FILE).write_text("{}")
  for s in steps:
    (path / run.CHECKPOINT_DIR / str(s)).mkdir()
  return path


def test_resume_skips_runs_stopped_before_their_first_checkpoint(tmp_path, capsys):
  parent = tmp_path / "runs"
  old = _fake_run(parent / "old", steps=(3,))
  (old / run.CHECKPOINT_DIR / "4.orbax-checkpoint-tmp-123").mkdir()  # unfinished save
  time.sleep(0.05)
  empty = _fake_run(parent / "new")  # killed while compiling: no checkpoint yet
  assert run.newest_run(parent) == old
  assert run.newest_run(empty) is None
  assert meta_train.main(["--resume", "--out", str(empty)]) == 2
  err = capsys.readouterr().err
  assert "no checkpointed run" in err and "without --resume" in err
  assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--config", "no_such_preset"], "--config: --config 'no_such_preset' is neither a preset"),
    (["--config", "{typo}"], "unknown MetaConfig fields ['outer_stepz']"),
    (["--config", "{negative}"], "MetaConfig.outer_steps=-5; expected an int >= 1"),
    (["--config", "{bad_json}"], "is not valid JSON"),
    (["--config", "{list}"], "expected a JSON object of MetaConfig fields"),
    (["--set", "outer_steps=-1"], "--set: MetaConfig.outer_steps=-1"),
    (["--set", "outer_steps"], "--set: expected FIELD=VALUE, got 'outer_steps'"),
])
def test_config_errors_are_one_line_exit_2(tmp_path, capsys, args, message):
  files = {"typo": '{"outer_stepz": 3}', "negative": '{"outer_steps": -5}',
           "bad_json": '{"outer_steps": 3,', "list": "[1, 2]"}
  for name, text in files.items():
    (tmp_path / f"{name}.json").write_text(text)
  args = [a.format(**{n: str(tmp_path / f"{n}.json") for n in files}) for a in args]
  assert meta_train.main([*args, "--out", str(tmp_path / "run")]) == 2
  err = capsys.readouterr().err
  assert message in err and "Traceback" not in err, err
  assert len(err.strip().splitlines()) == 1, err
  assert not (tmp_path / "run").exists()


def test_out_must_be_a_run_or_a_new_directory(tmp_path, capsys):
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "config.json").write_text('{"my": "own config"}')
  (mine / "notes.txt").write_text("x")
  (tmp_path / "file").write_text("x")
  for out, message in ((mine, "is not a meta-training run"), (tmp_path / "file", "is a file")):
    assert meta_train.main(["--config", "smoke", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
  assert (mine / "config.json").read_text() == '{"my": "own config"}'
