"""Every Python file of the repository compiles without warnings."""

import pathlib
import warnings

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Not ours: build outputs and environments that may sit in a working tree.
_SKIP = {".git", "build", "dist", ".venv", "venv", "__pycache__", ".eggs", "runs", "eval_out"}


def _sources():
  for path in sorted(ROOT.rglob("*.py")):
    if not _SKIP.intersection(path.relative_to(ROOT).parts):
      yield path


def test_no_invalid_escape_sequences():
  """Invalid escapes (\\| in a LaTeX docstring) are a SyntaxWarning from Python 3.12 on
  (a DeprecationWarning before) and are meant to become errors; compile every file
  with those warnings raised."""
  bad = []
  paths = list(_sources())
  assert len(paths) > 50, paths
  for path in paths:
    with warnings.catch_warnings():
      warnings.simplefilter("error", SyntaxWarning)
      warnings.simplefilter("error", DeprecationWarning)
      try:
        compile(path.read_bytes(), str(path), "exec", dont_inherit=True)
      except SyntaxError as e:
        bad.append(f"{path.relative_to(ROOT)}:{e.lineno}: {e.msg}")
  assert not bad, bad
