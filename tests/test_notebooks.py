"""The lesson pipeline itself: solution stripping, markers, building and drift detection."""

import textwrap
from pathlib import Path

import nbformat
import pytest

from pedaPEFT import notebooks, progress

LESSON = """\
# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A tiny lesson

# %%
from pedaPEFT import exercises
from pedaPEFT.course import check_version, seed_everything

check_version("0.1.0")
seed_everything(0)

# %%
values = [1, 2, 3]
print(sum(values))

# %%
### BEGIN SOLUTION
total = sum(values)
### END SOLUTION

# %%
exercises.check_integer(total, expected=6, name="total", hint="Add the values.")
"""


def test_strip_solutions_stubs_assignments_and_functions():
    source = textwrap.dedent('''\
        before = 1
        ### BEGIN SOLUTION
        a, (b, c) = 1, (2, 3)
        d: int = 4
        def f(x, y=2):
            """Add."""
            return x + y
        print("not kept")
        ### END SOLUTION
        after = 2''')
    stub = notebooks.strip_solutions(source)
    namespace: dict = {}
    exec(stub, namespace)
    assert namespace["a"] is Ellipsis and namespace["c"] is Ellipsis and namespace["d"] is Ellipsis
    assert namespace["before"] == 1 and namespace["after"] == 2
    with pytest.raises(NotImplementedError):
        namespace["f"](1)
    assert namespace["f"].__doc__ == "Add."
    assert "not kept" not in stub and "return x + y" not in stub


def test_strip_solutions_keeps_indentation():
    source = "if True:\n    ### BEGIN SOLUTION\n    x = 1\n    ### END SOLUTION\n    y = 2"
    assert notebooks.strip_solutions(source) == "if True:\n    x = ...  # YOUR CODE HERE\n    y = 2"


@pytest.mark.parametrize(
    "source",
    [
        "### BEGIN SOLUTION\nx = 1",
        "x = 1\n### END SOLUTION",
        "### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION",
        "### BEGIN SOLUTION here\nx = 1\n### END SOLUTION",
    ],
)
def test_broken_markers_are_rejected(source):
    with pytest.raises(notebooks.LessonError):
        notebooks.solution_regions(source)


def test_build_then_check_then_detect_drift(tmp_path: Path):
    script = tmp_path / "01_tiny.py"
    script.write_text(LESSON)
    lesson_path, student_path = notebooks.build(script)
    assert notebooks.check(tmp_path) == []

    lesson = notebooks.load(lesson_path)
    outputs = [output for cell in notebooks.code_cells(lesson) for output in cell.outputs]
    assert any("6" in output.get("text", "") for output in outputs)
    assert [cell.execution_count for cell in notebooks.code_cells(lesson)] == [1, 2, 3, 4]

    student = notebooks.load(student_path)
    assert all(not cell.outputs for cell in notebooks.code_cells(student))
    assert "total = ...  # YOUR CODE HERE" in student.cells[3].source

    script.write_text(LESSON.replace("print(sum(values))", "print(max(values))"))
    assert any("differs from 01_tiny.py" in problem for problem in notebooks.check(tmp_path))

    script.write_text(LESSON)
    student_path.write_text(student_path.read_text().replace("YOUR CODE HERE", "edited"))
    assert any("out of date" in problem for problem in notebooks.check(tmp_path))


def test_build_refuses_a_lesson_that_writes_to_stderr(tmp_path: Path):
    script = tmp_path / "01_noisy.py"
    script.write_text(LESSON + "\n# %%\nimport sys\nprint('careful', file=sys.stderr)\n")
    with pytest.raises(notebooks.LessonError, match="stderr"):
        notebooks.build(script)
    assert not script.with_suffix(".ipynb").exists()


def test_find_sources_rejects_unknown_names(tmp_path: Path):
    (tmp_path / "01_tiny.py").write_text(LESSON)
    assert notebooks.find_sources(["01"], tmp_path) == [tmp_path / "01_tiny.py"]
    with pytest.raises(ValueError, match="available: 01_tiny"):
        notebooks.find_sources(["07"], tmp_path)


@pytest.mark.parametrize("author_setting", ["environment variable", "data directory"])
def test_running_a_lesson_leaves_the_authors_progress_alone(author_setting, tmp_path, monkeypatch):
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "home" / "data"))
    if author_setting == "environment variable":
        monkeypatch.setenv(progress.ENV_VARIABLE, str(tmp_path / "author.json"))
    else:
        monkeypatch.delenv(progress.ENV_VARIABLE, raising=False)
    author = progress.progress_path()
    checked = nbformat.v4.new_notebook()
    checked.cells = [nbformat.v4.new_code_cell(
        "from pedaPEFT import progress\n"
        "assert progress.record('01-rref', 'passed')\n"
        "print(progress.load()['01-rref']['last'])")]
    executed = notebooks.execute(checked, cwd=tmp_path)
    assert executed.cells[0].outputs[0].text == "passed\n"  # recorded, somewhere else
    assert not author.exists()
