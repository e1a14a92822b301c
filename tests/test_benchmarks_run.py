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
