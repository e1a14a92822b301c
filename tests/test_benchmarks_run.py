"""Every script in benchmarks/ runs to its table at its smallest settings.

The scripts are run by hand (their numbers go in the README), so nothing else calls
them: a change of an engine function's signature broke update_passes.py once and
nobody saw it until the next benchmark run. These runs check that each script still
runs and prints its table -- not its numbers (timings are no test's business here).
The two that reach furthest into the engine's internals run with the suite; the rest,
slower to compile, with the slow tests (`pytest -m slow tests/test_benchmarks_run.py`).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
_SLOW = pytest.mark.slow

# (script and its smallest arguments, a line fragment its table must print)
RUNS = [
    pytest.param(["update_passes.py", "--sizes", "1000", "--repeats", "1", "--rounds",
                  "1"], "whole update", id="update_passes"),
    pytest.param(["step_cost.py", "--sizes", "1000", "--repeats", "1", "--rounds", "1",
                  "--step-size"], "load after", id="step_cost-step_size"),
    pytest.param(["step_cost.py", "--sizes", "1000", "--repeats", "1"],
                 "whole training step", id="step_cost", marks=_SLOW),
    pytest.param(["step_cost.py", "--muon", "1", "--rounds", "1", "--repeats", "1"],
                 "load after", id="step_cost-muon", marks=_SLOW),
    pytest.param(["step_cost.py", "--sizes", "1000", "--repeats", "1", "--transformers",
                  "1"], "MiB", id="step_cost-transformers", marks=_SLOW),
    pytest.param(["meta_throughput.py", "--members", "2", "--repeats", "1", "--horizon",
                  "20", "--truncation", "5"], "|", id="meta_throughput", marks=_SLOW),
    pytest.param(["task_throughput.py", "--suite", "smoke", "--steps", "5", "--seeds",
                  "1"], "quadratic_d8_k10_rot_n0.1", id="task_throughput", marks=_SLOW),
]


@pytest.mark.parametrize("argv, expected", RUNS)
def test_benchmark_script_runs_and_prints_its_table(argv, expected):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  out = subprocess.run([sys.executable, str(REPO / "benchmarks" / argv[0]), *argv[1:]],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  assert expected in out.stdout, out.stdout[-3000:]


# Imports every script as `python benchmarks/X.py` would (the script's folder first on
# sys.path), with a stand-in `metaopt` and `tasks` that fail to import next on the path:
# where an installed copy, or none, would be. The script must import this checkout's.
_IMPORT_PROBE = r"""
import pathlib, runpy, sys
repo, standins, scripts = sys.argv[1], sys.argv[2], sys.argv[3:]
base = [p for p in sys.path if p not in ("", repo)]
for script in scripts:
  for name in [m for m in sys.modules
               if m.split(".")[0] in ("metaopt", "tasks", "step_cost", "update_passes")]:
    del sys.modules[name]
  sys.path[:] = [str(pathlib.Path(script).parent), standins, *base]
  runpy.run_path(script, run_name="imported_by_test")
  for name in ("metaopt", "tasks"):
    module = sys.modules.get(name)
    assert module is None or module.__file__.startswith(repo), (script, module)
  print("imported", script)
"""


def test_every_benchmark_script_imports_this_checkout_without_install(tmp_path):
  for name in ("metaopt", "tasks"):
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text(
        f"raise ImportError('the {name} beside the checkout was imported')\n")
  scripts = sorted(str(p) for p in (REPO / "benchmarks").rglob("*.py"))
  assert len(scripts) >= 6, scripts
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  out = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, str(REPO), str(tmp_path),
                        *scripts], cwd=tmp_path, env={**env, "JAX_PLATFORMS": "cpu"},
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.count("imported ") == len(scripts), out.stdout
