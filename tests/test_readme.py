"""The README's quick start runs and lowers the loss; its commands are the supported ones."""

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _blocks(language):
  return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)


def test_readme_has_exactly_the_install_and_test_commands():
  assert [b.strip() for b in _blocks("bash")] == ['pip install -e ".[dev]"',
                                                  "python -m pytest"]


def test_readme_quick_start_trains():
  (code,) = _blocks("python")
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})  # pylint: disable=exec-used
  losses = [float(v) for v in re.findall(r"loss (\S+)", out.getvalue())]
  assert len(losses) >= 2, out.getvalue()
  assert losses[-1] < 0.1 * losses[0], out.getvalue()
