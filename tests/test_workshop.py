"""Workshop mode: every notebook has graded "your turn" cells, the student copies match, stubs fail and solutions pass.

    .venv/bin/pytest tests/test_workshop.py
"""

import contextlib
import io
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from lorakit.course import BEGIN, END, STUB, build_student, notebooks, strip_solutions, student_copy
from lorakit.launch import free_port

NOTEBOOKS = notebooks()
# Names an exercise cell may use from the notebook's first cells without importing them itself.
PREAMBLE = "import torch\nfrom pathlib import Path\n"


def exercise_cells(path: Path) -> list[str]:
    nb = nbformat.read(path, as_version=4)
    return [c.source for c in nb.cells if c.cell_type == "code" and BEGIN in c.source]


EXERCISES = [pytest.param(path, i, id=f"{path.stem}-{i}")
             for path in NOTEBOOKS for i in range(len(exercise_cells(path)))]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_two_exercises(path):
    cells = exercise_cells(path)
    assert len(cells) >= 2, f"{path.name}: {len(cells)} exercise cell(s), the course asks for at least 2"
    for source in cells:
        assert source.count(BEGIN) == source.count(END), f"{path.name}: unbalanced solution markers"


def test_strip_solutions_keeps_indentation_and_code_around():
    source = "def f(x):\n    y = 1\n    # BEGIN SOLUTION\n    return x + y\n    # END SOLUTION\n\nprint(f(1))"
    assert strip_solutions(source) == f"def f(x):\n    y = 1\n    {STUB}\n\nprint(f(1))"
    assert strip_solutions("a = 1") == "a = 1"


def test_student_copy_is_in_sync_and_has_no_solutions(tmp_path):
    written = build_student(tmp_path)
    assert [p.name for p in written] == [p.name for p in NOTEBOOKS]
    for path, copy in zip(NOTEBOOKS, written, strict=True):
        expected = student_copy(nbformat.read(path, as_version=4))
        got = nbformat.read(copy, as_version=4)
        assert got == expected, f"{copy.name} differs from student_copy({path.name})"
        text = copy.read_text()
        assert BEGIN not in text and END not in text, f"{copy.name}: solution markers survived"
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type == "code" and BEGIN in cell.source:
                solution = cell.source.split(BEGIN, 1)[1].split(END, 1)[0].strip().splitlines()[0].strip()
                assert solution not in text, f"{copy.name}: solution line {solution!r} survived"
        assert all(not c.get("outputs") for c in got.cells if c.cell_type == "code"), f"{copy.name} kept outputs"
        nbformat.validate(got)
    committed = Path(__file__).resolve().parent.parent / "student"
    if committed.is_dir():  # `make student` output, when present, must not lag behind the notebooks
        for path in written:
            if (committed / path.name).exists():
                assert (committed / path.name).read_text() == path.read_text(), f"rerun `make student`: {path.name}"


def stored_stdout(path: Path, index: int) -> str:
    """What the committed notebook shows under its index-th exercise cell: the text nbval compares a fresh run with."""
    cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code" and BEGIN in c.source]
    return "".join(o.get("text", "") for o in cells[index].outputs if o.output_type == "stream" and o.name == "stdout")


def run_cell(source: str, cwd: Path, monkeypatch) -> tuple[dict, str]:
    """Run an exercise cell as the notebook would; return its variables and what it printed."""
    monkeypatch.chdir(cwd)  # notebooks run from notebooks/, as in JupyterLab
    scope: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile(PREAMBLE + source, "<exercise>", "exec"), scope)  # noqa: S102 - the course's own cells
    return scope, printed.getvalue()


def check_result(scope: dict) -> bool:
    results = [v for k, v in scope.items() if k.endswith("_ok") or k == "passed"]
    assert results, "the exercise cell must store its check's verdict (e.g. exercise_ok = check_...(fn))"
    return all(r is True for r in results)


@pytest.mark.parametrize(("path", "index"), EXERCISES)
def test_solution_passes_and_stub_fails(path, index, monkeypatch):
    source = exercise_cells(path)[index]
    scope, printed = run_cell(source, path.parent, monkeypatch)
    assert check_result(scope), f"{path.name}: the reference solution fails"
    # the check's wording is part of the committed output: a change shows here, naming the cell, before nbval runs
    assert printed == stored_stdout(path, index), f"{path.name}, exercise {index}: rerun `make notebooks`"
    stub = strip_solutions(source)
    assert STUB in stub
    scope, printed = run_cell(stub, path.parent, monkeypatch)
    assert not check_result(scope), f"{path.name}: the stub passes its check"
    assert printed.startswith("❌ ") and printed.count("not written yet") == 1, printed


@pytest.fixture(scope="module")
def jupyter_server():
    jupyter = Path(sys.executable).with_name("jupyter")
    if not jupyter.exists() and shutil.which("jupyter") is None:
        pytest.skip("jupyter is not installed in this environment")
    port = free_port()
    proc = subprocess.Popen([str(jupyter if jupyter.exists() else "jupyter"), "lab", "--no-browser", "--port",
                             str(port), "--IdentityProvider.token=t", "--ServerApp.ip=127.0.0.1",
                             "--allow-root",
                             "--notebook-dir", str(NOTEBOOKS[0].parent)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{base}/api/status?token=t", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail("jupyter lab exited while starting")
                time.sleep(0.1)
        else:
            pytest.fail("jupyter lab did not answer within 30 s")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_notebooks_open_in_jupyterlab(jupyter_server):
    for path in NOTEBOOKS:
        with urllib.request.urlopen(f"{jupyter_server}/api/contents/{path.name}?token=t", timeout=30) as reply:
            assert reply.status == 200, path.name
            model = json.loads(reply.read())
        assert model["type"] == "notebook" and model["content"]["cells"], f"{path.name} opened without cells"
        assert len(model["content"]["cells"]) == len(nbformat.read(path, as_version=4).cells)
