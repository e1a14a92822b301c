"""Meta-training on a task of your own: tasks.from_functions, meta_train(tasks=...),
meta_train.py --task MODULE:FACTORY (recorded, rebuilt on --resume), the docs example.

The task is defined here; ``--task tests.test_meta_own_task:make_task`` imports this file
as a module (the tests run from the repository root).
"""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meta_train
import tasks
from metaopt import meta
from metaopt import mup
from metaopt.meta import checkpointing
from metaopt.meta import logging as log_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "meta_training.md"
FACTORY = "tests.test_meta_own_task:make_task"
# Only the task of this file (suite ""), a 2-wide LO, 2 pairs, 20-step episodes.
TINY = meta.MetaConfig(suite="", hidden_size=2, num_pairs=2, num_blind_pairs=0,
                       truncation_length=5, horizon=20, min_horizon=5, sigma=0.02,
                       outer_learning_rate=0.05, outer_steps=2, validation_every=0,
                       checkpoint_every=1, log_every=1)
LABELS = {"w1": "input", "b1": "vector", "w2": "output", "b2": "vector"}


def _init(key, width=16):
  return {"w1": jax.random.normal(key, (4, width)) / 2.0, "b1": jnp.zeros(width),
          "w2": jnp.zeros((width, 1)), "b2": jnp.zeros(1)}


def _loss(params, batch):
  h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  return jnp.mean(jnp.square(h @ params["w2"] + params["b2"] - batch["y"]))


def _sample_batch(key):
  x = jax.random.normal(key, (16, 4))
  return {"x": x, "y": jnp.sin(x[:, :1]) + 0.5 * x[:, 1:2]}


def make_task(name: str = "own_regression") -> tasks.Task:
  """The task of these tests: a 4-16-1 tanh regression, data generated on device."""
  return tasks.from_functions(name, init=_init, loss=_loss, sample_batch=_sample_batch,
                              roles=LABELS)


def not_a_task():
  return {"init": _init}


def _steps(out: pathlib.Path) -> list[int]:
  return [r["step"] for r in log_lib.read_metrics(out / "metrics.jsonl")
          if r["kind"] == "train"]


def test_from_functions_roles_labels_base_model_and_defaults():
  task = make_task()
  kinds = {k: r.kind for k, r in task.roles.items()}
  assert kinds == LABELS
  assert isinstance(task.config, tasks.FunctionTaskConfig) and task.num_params() == 97
  params = task.init(jax.random.PRNGKey(0))
  batch = jax.vmap(task.sample_batch)(jax.random.split(jax.random.PRNGKey(1), 3))
  assert jax.vmap(task.loss, (None, 0))(params, batch).shape == (3,)
  metrics = task.metrics(params, task.eval_batch())
  assert set(metrics) == {"loss"} and float(metrics["loss"]) > 0
  # A narrower base model: the muP rule gives input / hidden-free / output / vector.
  wide = tasks.from_functions("wide", init=lambda k: _init(k, 64), loss=_loss,
                              sample_batch=_sample_batch, base_init=_init)
  assert {k: r.kind for k, r in wide.roles.items()} == LABELS
  assert wide.roles["w2"] == mup.ParamRole("output", 64, 16)
  # A ParamRole tree as is, a callable of the shapes, a split-aware sampler.
  explicit = tasks.from_functions("explicit", init=_init, loss=_loss,
                                  sample_batch=lambda key, split="train": {
                                      **_sample_batch(key),
                                      "y": jnp.full((16, 1), 1.0 if split == "test" else 0.)},
                                  roles=lambda shapes: mup.sp_roles(shapes))
  assert float(explicit.eval_batch()["y"][0, 0]) == 1.0
  assert float(explicit.sample_batch(jax.random.PRNGKey(0))["y"][0, 0]) == 0.0
  with pytest.raises(ValueError, match="roles= or base_init=, not both"):
    tasks.from_functions("x", init=_init, loss=_loss, sample_batch=_sample_batch,
                         roles=LABELS, base_init=_init)
  with pytest.raises(ValueError, match="expected one of"):
    tasks.from_functions("x", init=_init, loss=_loss, sample_batch=_sample_batch,
                         roles={**LABELS, "w1": "embedding"})


def test_python_api_meta_trains_and_resumes_with_own_task(tmp_path):
  out = tmp_path / "run"
  config = TINY.replace(validation_every=2, validation_seeds=2)
  result = meta.meta_train(config, out, tasks=[make_task()], progress=False)
  assert result.summary["step"] == 2 and _steps(out) == [1, 2]
  assert result.summary["validation_task"] == "own_regression"
  assert np.isfinite(result.summary["final"]["informed"]["meta_loss"])
  train = [r for r in log_lib.read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
  assert train[0]["tasks"] == ["own_regression"]
  assert np.isfinite(train[-1]["loss/own_regression/informed"])
  assert (out / "final").is_dir()
  # Resumed with the same task, it continues; with another task's name it is refused.
  resumed = config.replace(outer_steps=3, validation_every=0)  # fewer programs to compile
  result = meta.meta_train(resumed, out, tasks=[make_task()], resume=True, progress=False)
  assert result.summary["step"] == 3 and _steps(out) == [1, 2, 3]
  with pytest.raises(checkpointing.CheckpointError, match="tasks"):
    meta.meta_train(resumed.replace(outer_steps=4), out, tasks=[make_task("renamed")],
                    resume=True, progress=False)


def test_python_api_task_errors(tmp_path):
  with pytest.raises(TypeError, match="expected tasks.Task objects"):
    meta.meta_train(TINY, tmp_path / "a", tasks=[not_a_task()])
  with pytest.raises(ValueError, match=r"\['own_regression'\] appear more than once"):
    meta.meta_train(TINY, tmp_path / "b", tasks=[make_task(), make_task()])
  with pytest.raises(ValueError, match="no tasks to meta-train on"):
    meta.meta_train(TINY, tmp_path / "c")
  assert not any(tmp_path.iterdir())  # nothing written before the tasks are checked


def test_docs_example_runs(tmp_path, monkeypatch):
  code = re.search(r"<!-- own-task example -->\n```python\n(.*?)```", DOCS.read_text(),
                   re.S).group(1)
  monkeypatch.chdir(tmp_path)
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    exec(compile(code, str(DOCS), "exec"), {"__name__": "docs_example"})  # pylint: disable=exec-used
  assert printed.getvalue().startswith("3 outer steps"), printed.getvalue()
  assert (tmp_path / "runs" / "my_task" / "final").is_dir()


def _cli(*args: str) -> int:
  return meta_train.main([*args, "--no-progress", "--compile-cache", ""])


def _tiny_config(tmp_path) -> str:
  path = tmp_path / "tiny.json"
  path.write_text(json.dumps(TINY.to_dict()))
  return str(path)


def test_cli_task_is_recorded_and_rebuilt_on_resume(tmp_path, capsys):
  out = tmp_path / "run"
  assert _cli("--config", _tiny_config(tmp_path), "--task", FACTORY, "--out", str(out)) == 0
  saved = json.loads((out / "config.json").read_text())
  assert saved["task_factories"] == [FACTORY] and _steps(out) == [1, 2]
  assert _cli("--resume", "--out", str(out), "--set", "outer_steps=3") == 0
  assert _steps(out) == [1, 2, 3]
  capsys.readouterr()
  assert _cli("--resume", "--out", str(out), "--set", "outer_steps=4",
              "--task", "tests.test_meta_own_task:not_a_task") == 2
  err = capsys.readouterr().err
  assert "differs from the run's task factories" in err and len(err.splitlines()) == 1


def test_cli_resume_of_a_task_that_cannot_be_rebuilt_is_one_line(tmp_path, capsys,
                                                                   monkeypatch):
  module = tmp_path / "mods" / "own_task_gone.py"
  module.parent.mkdir()
  module.write_text("from tests.test_meta_own_task import make_task\n")
  monkeypatch.syspath_prepend(str(module.parent))
  out = tmp_path / "run"
  assert _cli("--config", _tiny_config(tmp_path), "--set", "outer_steps=1",
              "--task", "own_task_gone:make_task", "--out", str(out)) == 0
  module.unlink()
  monkeypatch.delitem(sys.modules, "own_task_gone")
  capsys.readouterr()
  assert _cli("--resume", "--out", str(out), "--set", "outer_steps=2") == 2
  err = capsys.readouterr().err
  assert err.startswith("--resume: cannot rebuild a task of the run in "), err
  assert "'own_task_gone:make_task'" in err and "cannot import module" in err
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("spec, message", [
    ("tests.test_meta_own_task", "expected 'package.module:factory'"),
    ("no_such_module_xyz:make_task", "cannot import module 'no_such_module_xyz'"),
    ("tests.test_meta_own_task:missing", "has no function 'missing'"),
    ("tests.test_meta_own_task:not_a_task", "returned dict; expected a tasks.Task"),
])
def test_cli_bad_task_is_one_line_exit_2(tmp_path, capsys, spec, message):
  out = tmp_path / "run"
  assert _cli("--config", _tiny_config(tmp_path), "--task", spec, "--out", str(out)) == 2
  err = capsys.readouterr().err
  assert err.startswith("--task: ") and message in err and spec in err, err
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
  assert not out.exists()
