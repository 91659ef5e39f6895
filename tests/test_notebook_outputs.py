"""What a learner sees in the stored notebooks: clean outputs, a short set-up cell, the model switch honoured.

The stored outputs are what GitHub renders and what nbval compares against, so they are held to the course's rules:
no path of the machine that ran them, no cell output longer than a screen (40 lines), nothing on stderr, no warning
text, no error. Every notebook opens with a short first code cell that calls `lorakit.course.setup()`, and loads the
course model with `load_base()` so that `LORAKIT_MODEL` switches it.
"""

import re
import tempfile
from pathlib import Path

import nbformat
import pytest

from lorakit.course import NOTEBOOKS, ROOT, notebooks

MAX_LINES = 40
MACHINE_PATHS = sorted({str(ROOT), str(Path.home()), tempfile.gettempdir(), "/tmp/", "/home/", "/root/", "/Users/"},
                       key=len, reverse=True)
WARNING_TEXT = re.compile(r"\b\w*Warning\b|\bwarn(ing)?s?\.warn\(|^\s*warnings?:", re.M)


def output_text(output: nbformat.NotebookNode) -> str:
    if output.output_type == "stream":
        return output.text
    if output.output_type == "error":
        return "\n".join(output.traceback)
    return str(output.get("data", {}).get("text/plain", ""))


def stored_outputs() -> list[tuple[str, int, nbformat.NotebookNode]]:
    rows = []
    for path in notebooks():
        for index, cell in enumerate(nbformat.read(path, as_version=4).cells):
            for output in cell.get("outputs", []):
                rows.append((path.name, index, output))
    return rows


OUTPUTS = stored_outputs()


def test_every_notebook_has_stored_outputs():
    assert {name for name, _, _ in OUTPUTS} == {path.name for path in notebooks()}


@pytest.mark.parametrize(("name", "cell", "output"), OUTPUTS, ids=[f"{n}-c{c}-{i}" for i, (n, c, _) in
                                                                   enumerate(OUTPUTS)])
def test_stored_output_is_clean(name, cell, output):
    text = output_text(output)
    where = f"{name} cell {cell}"
    assert output.output_type != "error", f"{where} stored an error"
    assert output.get("name") != "stderr", f"{where} wrote to stderr: {text[:200]!r}"
    assert len(text.splitlines()) <= MAX_LINES, f"{where}: {len(text.splitlines())} lines (at most {MAX_LINES})"
    leaked = [path for path in MACHINE_PATHS if path in text]
    assert not leaked, f"{where} shows a machine path {leaked[0]!r}: {text[:200]!r}"
    assert not WARNING_TEXT.search(text), f"{where} shows warning text: {WARNING_TEXT.search(text).group()!r}"


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.name)
def test_first_code_cell_is_a_short_setup(path):
    first = next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    lines = first.source.splitlines()
    assert len(lines) <= 12, f"{path.name}: the first code cell has {len(lines)} lines (at most 12)"
    assert "setup()" in first.source, f"{path.name}: the first code cell should call lorakit.course.setup()"


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.name)
def test_the_course_model_follows_lorakit_model(path):
    sources = [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    pinned = [s for s in sources if re.search(r"load_base\(\s*['\"]tiny['\"]", s)]
    assert not pinned, f"{path.name} pins load_base('tiny'); use load_base() so LORAKIT_MODEL switches the model"


def test_the_checker_catches_what_it_should():
    bad = [nbformat.v4.new_output("stream", name="stderr", text="oops"),
           nbformat.v4.new_output("stream", name="stdout", text="\n".join(["x"] * 41)),
           nbformat.v4.new_output("stream", name="stdout", text=f"saved to {tempfile.gettempdir()}/run"),
           nbformat.v4.new_output("stream", name="stdout", text="FutureWarning: `x` is deprecated")]
    for output in bad:
        with pytest.raises(AssertionError):
            test_stored_output_is_clean("fake.ipynb", 0, output)
    test_stored_output_is_clean("fake.ipynb", 0, nbformat.v4.new_output("stream", name="stdout", text="ok\n"))
    assert NOTEBOOKS.is_dir()
