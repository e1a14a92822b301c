"""The README's quick start runs and lowers the loss; its commands are the supported ones."""

import contextlib
import io
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _blocks(language):
  return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)


def test_readme_has_exactly_the_install_test_and_run_commands():
  assert [b.strip() for b in _blocks("bash")] == ['pip install -e ".[dev]"',
                                                  "python -m pytest",
                                                  "python meta_train.py"]


@pytest.mark.parametrize("index", range(3))
def test_readme_examples_train(index):
  """The quick start (a classical optimizer) and the Flax and Haiku drop-in examples."""
  blocks = _blocks("python")
  assert len(blocks) == 3
  code = blocks[index]
  if index:  # the drop-in examples stay short: under 25 non-blank lines
    assert len([line for line in code.splitlines() if line.strip()]) < 25
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})  # pylint: disable=exec-used
  losses = [float(v) for v in re.findall(r"loss (\S+)", out.getvalue())]
  assert len(losses) >= 2, out.getvalue()
  assert losses[-1] < 0.1 * losses[0], out.getvalue()
