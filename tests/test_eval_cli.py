"""evaluate.py end to end on the smoke suite, resuming from its cache, and bad input."""

import csv
import importlib.util
import pathlib
import re

import numpy as np
import pytest

import metaopt

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _module(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


evaluate = _module("evaluate")

# A recomputed run is the same computation in a vmap batch of another size, so its float32
# rounding differs and training amplifies it: 5e-7 relative on loss curves after 50 AdamW
# steps on one x86 CPU, up to ~1e-4 on others (see tests/test_tasks_training.py).
# RERUN_RTOL keeps the three significant digits the former 6-character prefix compared,
# without its failure on a carry (0.09999 and 0.10000 differ in every character).
RERUN_RTOL = 1e-3

SMOKE_FLAGS = ["--suite", "smoke", "--seeds", "2", "--lr-grid-size", "3",
               "--untuned", "prodigy", "--no-progress"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
  """A learned-optimizer artifact on disk, as ``--checkpoint`` takes it.

  The muAdamW warm start, saved: what evaluate.py does with an artifact does not depend on
  how its theta was trained, and a meta-trained run's ``final`` artifact loading through
  ``metaopt.load`` is covered by tests/test_meta_distributed.py and test_meta_own_task.py
  (meta-training one here cost the suite ~50 s).
  """
  out = tmp_path_factory.mktemp("artifact") / "lo"
  metaopt.checkpoint.save(metaopt.LearnedOptimizer.from_classical("adamw", mup=True), out)
  return out


@pytest.fixture(scope="module")
def smoke_out(artifact, tmp_path_factory):
  out = tmp_path_factory.mktemp("eval")
  assert evaluate.main(["--checkpoint", str(artifact), "--out", str(out), *SMOKE_FLAGS]) == 0
  return out


def _rows(out):
  with open(out / "runs.csv") as f:
    return list(csv.DictReader(f))


def test_smoke_writes_report_csv_and_plots(smoke_out):
  report = (smoke_out / "report.md").read_text()
  assert "## Summary" in report and "| lo | adamw |" in report and "Definitions" in report
  rows = _rows(smoke_out)
  keys = [(r["task"], r["optimizer"], r["schedule"], r["lr"], r["seed"]) for r in rows]
  assert len(keys) == len(set(keys))
  # Per task: LO 2 seeds + AdamW 3 lrs x 2 schedules x 2 seeds + Prodigy 2 seeds.
  assert len(rows) == 2 * (2 + 3 * 2 * 2 + 2)
  assert {r["optimizer"] for r in rows} == {"lo", "adamw", "prodigy (default)"}
  plots = {p.name for p in (smoke_out / "plots").iterdir()}
  assert "ranks.png" in plots and sum(p.startswith("curves_") for p in plots) == 2


def test_rerun_recomputes_only_deleted_runs(smoke_out, artifact):
  files = sorted((smoke_out / "cache").glob("*/*/*.json"))
  deleted = files[::2]
  kept = {f: f.stat().st_mtime_ns for f in files[1::2]}
  for f in deleted:
    f.unlink()
  before = _rows(smoke_out)
  assert evaluate.main(["--checkpoint", str(artifact), "--out", str(smoke_out),
                        *SMOKE_FLAGS]) == 0
  header = re.search(r"runs: (\d+) \((\d+) computed now", (smoke_out / "report.md").read_text())
  assert header.groups() == (str(len(files)), str(len(deleted)))
  assert all(f.exists() for f in deleted)
  assert all(f.stat().st_mtime_ns == t for f, t in kept.items())
  after = _rows(smoke_out)
  key = lambda r: (r["task"], r["optimizer"], r["schedule"], r["lr"], r["seed"], r["stage"])
  assert sorted(map(key, after)) == sorted(map(key, before))
  old = {key(r): float(r["final_loss"]) for r in before}
  for r in after:
    np.testing.assert_allclose(float(r["final_loss"]), old[key(r)], rtol=RERUN_RTOL,
                               err_msg=str(key(r)))


@pytest.mark.parametrize("flags, message", [
    (["--suite", "nope"], r"unknown suite 'nope'.*heldout.*smoke"),
    (["--suite", "smoke", "--baselines", "adamw,nope"], r"unknown optimizer 'nope'.*lion"),
    (["--suite", "smoke", "--checkpoint", str(ROOT)], r"is not a metaopt learned-optimizer"),
    (["--suite", "smoke", "--checkpoint", "no_such_release"],
     r"(?s)no released learned optimizer named 'no_such_release'.*--checkpoint runs/"),
])
def test_bad_input_says_what_is_valid(flags, message, tmp_path, capsys):
  assert evaluate.main([*flags, "--out", str(tmp_path)]) == 2
  assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("flags, message", [
    (["--tasks", "mlp_digitz"], r"--tasks: 'mlp_digitz' matches no task of the smoke "
                                r"suite; its tasks are .*mlp_digits_w16"),
    (["--tasks", "mlp,nope"], r"--tasks: 'nope' matches no task"),
    (["--warmup-fraction", "2"], r"--warmup-fraction: warmup_fraction=2.0; expected a "
                                 r"value in \[0, 1\)"),
    (["--lr-grid-size", "0"], r"--lr-grid-size: lr_grid_size=0; expected an int >= 1"),
    (["--suite", "widths", "--widths", "64,abc"], r"--widths '64,abc': expected "
                                                   r"comma-separated positive ints"),
    (["--suite", "widths", "--widths", "64,-1"], r"--widths: widths=\(64, -1\)"),
    (["--seeds", "0"], r"seeds=0"),
    # argparse's own type errors are one line too, naming the flag.
    (["--max-memory-gb", "-1"], r"--max-memory-gb: max_memory_gb=-1.0; expected a "
                                r"finite number > 0"),
    (["--max-memory-gb", "nan"], r"--max-memory-gb: max_memory_gb=nan; expected a "
                                 r"finite number > 0"),
    (["--max-memory-gb", "lots"], r"--max-memory-gb: max_memory_gb='lots'; expected a "
                                  r"number"),
    (["--seeds", "two"], r"--seeds: seeds='two'; expected an int >= 1"),
    (["--tune-seeds", "-3"], r"--tune-seeds: tune_seeds=-3; expected an int >= 1"),
    (["--finalists", "0"], r"--finalists: finalists=0; expected an int >= 1"),
    (["--lo-grid-size", "1.5"], r"--lo-grid-size: lo_grid_size='1.5'; expected an int"),
    (["--lr-span", "inf"], r"--lr-span: lr_span_decades=inf; expected a value in "
                           r"\[0, inf\)"),
    (["--lo-span", "-2"], r"--lo-span: lo_span_decades=-2.0; expected a value in "
                          r"\[0, inf\)"),
    (["--warmup-fraction", "nan"], r"--warmup-fraction: warmup_fraction=nan; expected a "
                                   r"value in \[0, 1\)"),
    (["--no-such-flag"], r"unrecognized arguments: --no-such-flag"),
])
def test_bad_values_are_one_line_exit_2_and_write_nothing(flags, message, tmp_path, capsys):
  out = tmp_path / "out"
  assert evaluate.main(["--suite", "smoke", *flags, "--out", str(out), "--estimate"]) == 2
  err = capsys.readouterr().err
  assert re.search(message, err), err
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
  assert not out.exists()


def test_tuned_is_an_alias_of_baselines_and_takes_muon():
  args = evaluate.parser().parse_args(["--suite", "smoke", "--tuned", "adamw,muon"])
  assert evaluate.config_from_args(args).tuned == ("adamw", "muon")


@pytest.mark.parametrize("where", ["file", "below_a_file"])
def test_out_that_cannot_be_a_directory_is_one_line_exit_2_before_any_work(
    where, tmp_path, capsys, monkeypatch):
  thesis = tmp_path / "thesis.txt"
  thesis.write_text("my thesis")
  out = thesis if where == "file" else thesis / "eval"

  def no_work(*args):
    raise AssertionError("evaluate.py started work before checking --out")

  monkeypatch.setattr(evaluate, "_load_lo", no_work)
  assert evaluate.main(["--suite", "smoke", "--out", str(out), "--no-progress"]) == 2
  err = capsys.readouterr().err
  assert re.search(rf"--out {re.escape(str(out))}: {re.escape(str(thesis))} exists and "
                   "is not a directory", err), err
  assert len(err.strip().splitlines()) == 1, err
  assert thesis.read_text() == "my thesis"


def test_max_memory_gb_must_be_positive_in_the_config_too():
  from metaopt.eval import harness  # pylint: disable=g-import-not-at-top
  for bad in (-1.0, 0.0, float("nan"), float("inf")):
    with pytest.raises(ValueError, match=rf"max_memory_gb={bad!r}; expected a finite"):
      harness.EvalConfig(max_memory_gb=bad)
