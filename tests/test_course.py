"""Course tooling: solution stripping for student copies, reading inline cells back, the notebook list."""

import nbformat
import pytest

from lorakit import course

EXERCISE = '''def double(x):
    """Your turn: return twice x."""
    # BEGIN SOLUTION
    y = x + x
    return y
    # END SOLUTION


check(double)
'''


def test_strip_solutions_keeps_indentation_and_the_check():
    stripped = course.strip_solutions(EXERCISE)
    assert "x + x" not in stripped and "BEGIN SOLUTION" not in stripped
    assert f"    {course.STUB}\n" in stripped
    assert stripped.rstrip().endswith("check(double)")
    namespace = {}
    exec(stripped.replace("check(double)", ""), namespace)
    with pytest.raises(NotImplementedError):
        namespace["double"](2)


def test_student_copy_clears_outputs_and_leaves_the_original_alone():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(EXERCISE, outputs=[
        nbformat.v4.new_output("stream", name="stdout", text="ok")], execution_count=3)])
    copy = course.student_copy(nb)
    assert copy.cells[0].outputs == [] and copy.cells[0].execution_count is None
    assert "x + x" in nb.cells[0].source and nb.cells[0].outputs


def test_code_cells_finds_marked_cells_and_names_the_notebook_when_missing(tmp_path):
    path = tmp_path / "01_x.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("# inline: thing\nx = 1")]), path)
    assert course.code_cells(path, "# inline: thing") == "# inline: thing\nx = 1"
    with pytest.raises(LookupError, match="01_x.ipynb"):
        course.code_cells(path, "# inline: other")


def test_notebooks_are_numbered_in_order():
    names = [p.name for p in course.notebooks()]
    assert names == sorted(names) and names[0].startswith("00_")


def test_table_reports_each_notebook_and_names_a_failure(tmp_path, capsys):
    good, bad = tmp_path / "good.ipynb", tmp_path / "bad.ipynb"
    for path, source in ((good, "x = 1 + 1"), (bad, "raise ValueError('broken on purpose')")):
        nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)]), path)
    assert course.table([good]) == 0
    assert course.table([good, bad]) == 1
    rows = capsys.readouterr().out.splitlines()
    assert rows[-2].startswith("good.ipynb") and rows[-2].endswith("ok")
    assert rows[-1].startswith("bad.ipynb") and "FAILED" in rows[-1] and "broken on purpose" in rows[-1], rows[-1]
