"""meta_train.py as a user meets it: preemption, deadlines, resuming, bad configs, --out.

SIGTERM (how schedulers preempt a job) is handled like Ctrl-C: the state is
checkpointed, one line says how to continue, the exit status is 128 + the signal; in
every phase (a compile included) the process is gone within 10 s. --stop-after does
the same at a deadline, exit 0. Configuration mistakes end in one line naming the value
and exit 2, never a traceback.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest

import meta_train
from metaopt.meta import logging as log_lib
from metaopt.meta import run
from metaopt.meta import stopping

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


def _start(tmp_path, config: pathlib.Path, *extra) -> tuple[subprocess.Popen, pathlib.Path,
                                                             pathlib.Path]:
  """meta_train.py in a subprocess (CPU, SIGINT ignored as in a background job);
  returns the process, its run directory and its log (stdout and stderr)."""
  out = tmp_path / "run"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
         "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
  env.pop("XLA_FLAGS", None)
  log = tmp_path / "log.txt"
  started = time.time()
  proc = subprocess.Popen([sys.executable, REPO / "meta_train.py", "--config", config,
                           "--out", out, "--compile-cache", "", *extra], cwd=REPO, env=env,
                          stdout=log.open("w"), stderr=subprocess.STDOUT,
                          preexec_fn=_ignore_sigint)
  proc.started = started
  return proc, out, log


def _wait_for(proc, log: pathlib.Path, ready, what: str) -> None:
  deadline = time.time() + TIMEOUT_S
  while not ready():
    assert proc.poll() is None, log.read_text()[-3000:]
    assert time.time() < deadline, f"the run never reached {what}"
    time.sleep(0.02)


def _stop_line(log: pathlib.Path, prefix: str) -> str:
  text = log.read_text()
  assert "Traceback" not in text, text[-3000:]
  lines = [l for l in text.splitlines() if l.startswith(prefix)]
  assert len(lines) == 1, text[-3000:]
  return lines[0]


@pytest.mark.parametrize("sig, code, every", [(signal.SIGTERM, 143, 1000),
                                              (signal.SIGINT, 130, 1000),
                                              (signal.SIGTERM, 143, 1)])
def test_signal_checkpoints_and_exits_with_one_clean_line(tmp_path, sig, code, every):
  """every=1: the signal lands right after a checkpointed step (issue 24 item 2: the
  same step saved again was StepAlreadyExistsError, exit 1)."""
  proc, out, log = _start(tmp_path, _config(tmp_path, checkpoint_every=every),
                          "--no-progress")
  _wait_for(proc, log, lambda: _steps_logged(out) >= 2, "step 2")
  proc.send_signal(sig)
  assert proc.wait(timeout=TIMEOUT_S) == code, log.read_text()[-3000:]
  name = "SIGTERM" if sig == signal.SIGTERM else "SIGINT"
  line = _stop_line(log, "interrupted")
  assert line.startswith(f"interrupted by {name}: saved step ") and "--resume --out" in line
  saved = int(line.split("saved step ")[1].split(";")[0])
  assert saved >= 2 and (out / run.CHECKPOINT_DIR / str(saved)).is_dir()
  assert run.newest_run(out) == out


def test_a_second_ctrl_c_neither_corrupts_the_line_nor_hangs(tmp_path):
  """Issue 24 item 3: a second SIGINT 15 ms after the first printed "before the first
  outer step" at step 7, then hung on orbax's threads about half the time."""
  proc, out, log = _start(tmp_path, _config(tmp_path, checkpoint_every=1), "--no-progress")
  _wait_for(proc, log, lambda: _steps_logged(out) >= 3, "step 3")
  proc.send_signal(signal.SIGINT)
  time.sleep(0.015)
  proc.send_signal(signal.SIGINT)
  sent = time.time()
  assert proc.wait(timeout=TIMEOUT_S) == 130, log.read_text()[-3000:]
  assert time.time() - sent < 10
  line = _stop_line(log, "interrupted")
  saved = int(line.split("saved step ")[1].split(";")[0])
  assert saved >= 3 and (out / run.CHECKPOINT_DIR / str(saved)).is_dir()


# One task of the default preset: its program takes tens of seconds to compile on CPU.
SLOW_COMPILE = {"suite": "meta_train_default",
                "task_names": ["mlp_digits_w128_d1_gelu_b128_mup"], "num_pairs": 1,
                "num_blind_pairs": 0, "validation_every": 0, "outer_steps": 100000}


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_compilation_ends_the_process_within_10_s(tmp_path, sig, code):
  """Issue 24 item 4: 45 s into the default preset (compiling in threads) the process
  was still running 15 s after either signal (a handler cannot interrupt XLA)."""
  config = tmp_path / "slow.json"
  config.write_text(json.dumps(SLOW_COMPILE))
  proc, out, log = _start(tmp_path, config)
  _wait_for(proc, log, lambda: "compiling" in log.read_text(), "compiling")
  time.sleep(1.0)
  proc.send_signal(sig)
  sent = time.time()
  try:
    assert proc.wait(timeout=10) == code, log.read_text()[-3000:]
  finally:
    if proc.poll() is None:
      proc.kill()
  assert time.time() - sent < 10
  name = "SIGTERM" if sig == signal.SIGTERM else "SIGINT"
  line = _stop_line(log, "interrupted")
  assert line == (f"interrupted by {name} while compiling: nothing was saved (no outer "
                  "step had finished)"), line
  assert not run.newest_run(out)


def test_stop_after_checkpoints_the_last_step_and_exits_0(tmp_path):
  proc, out, log = _start(tmp_path, _config(tmp_path), "--no-progress", "--stop-after", "30")
  assert proc.wait(timeout=TIMEOUT_S) == 0, log.read_text()[-3000:]
  age = time.time() - proc.started
  line = _stop_line(log, "stopped")
  assert line.startswith("stopped at the --stop-after deadline (30 s)"), line
  if "saved step" in line:
    saved = int(line.split("saved step ")[1].split(";")[0])
    assert (out / run.CHECKPOINT_DIR / str(saved)).is_dir()
    assert saved == _steps_logged(out) or saved == _steps_logged(out) - 1
  assert age < 30 + 10


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


class _FakeCheckpoints:
  """RunCheckpoints' interface writing empty step directories (as orbax finishes them)."""

  def __init__(self, directory: pathlib.Path, delay_s: float = 0.0):
    self.directory, self.delay_s, self.saved = directory, delay_s, []

  def save(self, step, state):
    del state
    time.sleep(self.delay_s)
    (self.directory / str(step)).mkdir(parents=True, exist_ok=True)
    self.saved.append(step)

  def wait(self):
    pass


def _watched(tmp_path, phase, **kwargs):
  """A Stop whose watchdog records its exit instead of exiting."""
  exits, stream = [], io.StringIO()
  stop = stopping.Stop(exit_fn=exits.append, stream=stream, **kwargs)
  stop.set_run(tmp_path, tmp_path / "checkpoints")
  stop.checkpoints = _FakeCheckpoints(tmp_path / "checkpoints")
  stop.set_phase(phase)
  stop.start_watchdog()
  return stop, exits, stream


def _exited(exits, within_s: float) -> None:
  deadline = time.monotonic() + within_s
  while not exits and time.monotonic() < deadline:
    time.sleep(0.01)


@pytest.mark.parametrize("phase", stopping.UNINTERRUPTIBLE)
def test_watchdog_ends_phases_the_main_thread_cannot_leave_at_once(tmp_path, phase):
  stop, exits, stream = _watched(tmp_path, phase)
  start = time.monotonic()
  stop.handle_signal(signal.SIGTERM, None)
  _exited(exits, 5)
  assert exits == [143] and time.monotonic() - start < 2
  assert stream.getvalue() == (f"interrupted by SIGTERM {stopping._PHASE_WORDS[phase]}: "
                               "nothing was saved (no outer step had finished)\n")


def test_watchdog_checkpoints_the_last_step_of_a_step_that_does_not_end(tmp_path):
  """The main thread is stuck in a long outer step: after the grace period the
  watchdog saves the last finished step itself, prints the line, exits."""
  stop, exits, stream = _watched(tmp_path, "stepping", grace_s=0.3)
  stop.finished_step(6, "state")
  stop.handle_signal(signal.SIGINT, None)
  stop.handle_signal(signal.SIGINT, None)  # a second Ctrl-C: counted, ignored
  _exited(exits, 5)
  assert exits == [130] and stop.checkpoints.saved == [6] and stop.ignored == 1
  assert stream.getvalue() == (f"interrupted by SIGINT: saved step 6; continue with "
                               f"--resume --out {tmp_path}\n")


def test_watchdog_gives_up_on_a_checkpoint_that_does_not_finish(tmp_path):
  stop, exits, stream = _watched(tmp_path, "stepping", grace_s=0.1, hard_limit_s=0.6)
  (tmp_path / "checkpoints" / "4").mkdir(parents=True)
  stop.checkpoints.delay_s = 30.0
  stop.finished_step(5, "state")
  stop.request("SIGTERM")
  _exited(exits, 5)
  assert exits == [143]
  assert stream.getvalue().startswith("interrupted by SIGTERM: saved step 4; continue ")
  assert "(step 5's checkpoint: did not finish in time)" in stream.getvalue()


def test_deadline_stops_like_a_signal_with_exit_0(tmp_path):
  stop, exits, stream = _watched(tmp_path, "compiling",
                                 deadline=time.monotonic() + 0.3, stop_after=12.5)
  (tmp_path / "checkpoints" / "7").mkdir(parents=True)  # a resumed run's step
  _exited(exits, 5)
  assert exits == [0] and stop.reason == stopping.DEADLINE
  assert stream.getvalue() == ("stopped at the --stop-after deadline (12.5 s) while "
                               f"compiling: saved step 7; continue with --resume --out "
                               f"{tmp_path}\n")


def test_main_thread_and_watchdog_print_the_line_once(tmp_path):
  """(And the watchdog still ends the process if the interpreter's exit hangs.)"""
  stop, exits, stream = _watched(tmp_path, "stepping", grace_s=0.2, hard_limit_s=0.5)
  stop.finished_step(3, "state")
  stop.request("SIGTERM")
  interrupted = stop.finish()  # the main thread's way out
  assert stop.report(str(interrupted))
  _exited(exits, 5)
  assert exits == [143] and stream.getvalue().count("\n") == 1
  assert interrupted.step == 3 and interrupted.exit_code == 143
  stop.close()


def test_a_run_directory_is_locked_by_the_process_training_in_it(tmp_path, capsys):
  """Issue 24 item 8: two runs on one --out both 'finished', each step logged twice and
  one's checkpoints and final/ replaced by the other's."""
  out = tmp_path / "run"
  holder = run.lock_run(out)
  try:
    args = ["--config", str(_config(tmp_path, outer_steps=1)), "--out", str(out),
            "--no-progress", "--compile-cache", ""]
    assert meta_train.main(args) == 2
    err = capsys.readouterr().err
    assert err == (f"--out: {out.absolute()} is in use by another meta-training process "
                   f"(pid {os.getpid()}); wait for it to end or choose another --out.\n")
    assert not (out / log_lib.METRICS_FILE).exists()
  finally:
    holder.close()
  # A lock file left by a process that died holds no lock (flock dies with it).
  script = (f"import fcntl, os; f = open({str(out / run.LOCK_FILE)!r}, 'w'); "
            "fcntl.flock(f, fcntl.LOCK_EX); f.write(str(os.getpid())); f.flush(); "
            "os._exit(0)")
  subprocess.run([sys.executable, "-c", script], check=True)
  run.lock_run(out).close()
  assert meta_train._out_problem(out, run) is None  # the lock file alone: still new


def test_a_full_disk_while_training_is_one_line_exit_74(tmp_path, capsys, monkeypatch):
  """Issue 24 item 11: ENOSPC ended in a traceback."""
  written = []

  def write(self, record):
    if record.get("kind") == "train" and record["step"] == 2:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
    written.append(record)

  monkeypatch.setattr(log_lib.MetricsLog, "write", write)
  out = tmp_path / "run"
  args = ["--config", str(_config(tmp_path, outer_steps=3, checkpoint_every=1)),
          "--out", str(out), "--no-progress", "--compile-cache", ""]
  assert meta_train.main(args) == meta_train.EXIT_IO == 74
  err = capsys.readouterr().err
  assert err == (f"error: cannot write {out.absolute() / log_lib.METRICS_FILE}: No space "
                 "left on device (ENOSPC); files written before are intact (a run "
                 "continues with --resume from its newest checkpoint)\n"), err
  assert (out / run.CHECKPOINT_DIR / "1").is_dir()  # nothing lost
  assert [r["step"] for r in written if r.get("kind") == "train"] == [1]


def _lease(tmp_path, out: pathlib.Path, *args) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "LEASE_MARGIN_S": "5",
         "PYTHON": sys.executable, "LEASE_WORK": str(tmp_path / f"work_{out.name}"),
         "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
  env.pop("XLA_FLAGS", None)
  return subprocess.run(["bash", REPO / "scripts" / "gpu_lease.sh", "200", out, *args],
                        cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=TIMEOUT_S)


def _unpack(pack: pathlib.Path, to: pathlib.Path) -> pathlib.Path:
  import tarfile  # pylint: disable=g-import-not-at-top
  parts = sorted(pack.glob("lease-run.tar.gz*"))
  data = b"".join(p.read_bytes() for p in parts)
  to.mkdir()
  with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
    tar.extractall(to)
  return to


def test_a_lease_packs_a_light_run_that_the_next_lease_continues(tmp_path):
  """scripts/gpu_lease.sh end to end at tiny sizes on CPU: train, export every
  checkpoint, pack at most 8 files of at most 16 MiB; a second lease given the first's
  pack continues the run (light checkpoints: fresh episodes, same theta)."""
  import metaopt  # pylint: disable=g-import-not-at-top
  config = _config(tmp_path, outer_steps=3, checkpoint_every=1, checkpoint_populations=False)
  first = _lease(tmp_path, tmp_path / "pack1", "--", "--config", str(config))
  assert first.returncode == 0, first.stderr[-3000:]
  files = sorted((tmp_path / "pack1").iterdir())
  assert 1 <= len(files) <= 8 and all(f.stat().st_size <= 16 * 2**20 for f in files)
  assert {f.name for f in files} >= {"lease-run.tar.gz", "lease-cache.tar.gz"}
  unpacked = _unpack(tmp_path / "pack1", tmp_path / "unpacked1")
  assert sorted(p.name for p in (unpacked / "artifacts").iterdir()) == [
      "step_1", "step_2", "step_3"]
  metaopt.load(unpacked / "artifacts" / "step_3")
  assert not list((unpacked / "run" / "checkpoints").rglob("*populations*"))
  second = _lease(tmp_path, tmp_path / "pack2", str(tmp_path / "pack1"), "--", "--config",
                  str(config), "--set", "outer_steps=5")
  assert second.returncode == 0, second.stderr[-3000:]
  unpacked = _unpack(tmp_path / "pack2", tmp_path / "unpacked2")
  assert sorted(p.name for p in (unpacked / "artifacts").iterdir()) == [
      f"step_{s}" for s in range(1, 6)]
  records = log_lib.read_metrics(unpacked / "run")
  assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5]
  assert [r["step"] for r in records if r["kind"] == "resume"] == [3]
  # On a CPU the run splits its populations over meta_train's default CPU devices.
  assert [r["devices"] for r in records if r["kind"] == "resume"] == [meta_train.CPU_DEVICES]
  assert "newest checkpoint 5" in second.stdout


def test_the_compile_cache_keeps_every_program_and_gpu_autotuning_is_off(tmp_path,
                                                                          monkeypatch):
  """Issue 22 items 1 and 4: small init programs were not cached (1 s threshold), and
  autotuning cost a lease minutes of start-up."""
  import jax  # pylint: disable=g-import-not-at-top
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  before = {n: getattr(jax.config, n) for n in names}
  try:
    meta_train._compile_cache(str(tmp_path / "cache"), tmp_path / "run")
    assert [getattr(jax.config, n) for n in names] == [str(tmp_path / "cache"), 0, 0]
  finally:
    for n, v in before.items():
      jax.config.update(n, v)
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
  meta_train._autotune_off()
  meta_train._autotune_off()
  assert os.environ["XLA_FLAGS"] == ("--xla_cpu_enable_fast_math=false "
                                     "--xla_gpu_autotune_level=0")
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_autotune_level=4")  # the user's choice
  meta_train._autotune_off()
  assert os.environ["XLA_FLAGS"] == "--xla_gpu_autotune_level=4"
  monkeypatch.delenv("XLA_FLAGS")
  meta_train._autotune_off()
  assert os.environ["XLA_FLAGS"] == "--xla_gpu_autotune_level=0"


def test_cpu_devices_split_only_a_fresh_single_process_cpu_run(monkeypatch):
  """--cpu-devices N sets N CPU devices before JAX starts a backend; the user's
  XLA_FLAGS count, a multi-process run and a started backend keep theirs."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.devices()  # this test process has a backend: nothing may change it
  monkeypatch.setenv("XLA_FLAGS", "")
  meta_train._split_cpu(2, distributed=False)
  assert os.environ["XLA_FLAGS"] == ""
  monkeypatch.setattr(sys.modules["jax._src.xla_bridge"], "_backends", {})
  meta_train._split_cpu(2, distributed=True)
  meta_train._split_cpu(1, distributed=False)
  assert os.environ["XLA_FLAGS"] == ""
  meta_train._split_cpu(2, distributed=False)
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
  meta_train._split_cpu(2, distributed=False)
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"
