"""The lessons: in sync with their scripts, lint-clean, and their student copies fail helpfully.

The strict nbval run (collected from ``lessons/``) proves that every stored output, including
each solution's check, is reproduced by a fresh run; these tests check everything else.
"""

import re
from pathlib import Path

import pytest

import pedaPEFT
from pedaPEFT import notebooks
from pedaPEFT.course import _parse

SOURCES = notebooks.lesson_sources()
NBVAL_MARKERS = {
    "NBVAL_IGNORE_OUTPUT",
    "NBVAL_CHECK_OUTPUT",
    "NBVAL_SKIP",
    "NBVAL_RAISES_EXCEPTION",
}
MINIMUM_EXERCISES = 3


def lesson_id(path: Path) -> str:
    return path.stem


@pytest.fixture(scope="module", params=SOURCES, ids=lesson_id)
def lesson(request):
    return notebooks.load(request.param.with_suffix(".ipynb"))


def test_there_are_lessons():
    assert SOURCES, "no lesson scripts found in lessons/"


def test_notebooks_and_student_copies_match_their_scripts():
    problems = notebooks.check()
    assert not problems, "\n".join(problems)


def test_kernelspec_is_python3(lesson):
    assert lesson.metadata["kernelspec"]["name"] == "python3"


def test_execution_counts_run_one_to_n(lesson):
    counts = [cell.execution_count for cell in notebooks.code_cells(lesson)]
    assert counts == list(range(1, len(counts) + 1)), "rebuild the lesson top to bottom"


def test_no_stored_errors_or_stderr(lesson):
    for number, cell in enumerate(notebooks.code_cells(lesson)):
        for output in cell.outputs:
            assert output.output_type != "error", f"code cell {number} stored an error"
            assert output.get("name") != "stderr", f"code cell {number} stored stderr output"


def test_markers_are_whole_comment_lines(lesson):
    for cell in notebooks.code_cells(lesson):
        for line in cell.source.splitlines():
            stripped = line.strip()
            if "NBVAL" in stripped:
                assert stripped.lstrip("#").strip() in NBVAL_MARKERS, f"bad marker: {line!r}"
            if "SOLUTION" in stripped and stripped.startswith("#"):
                assert stripped in (notebooks.BEGIN_SOLUTION, notebooks.END_SOLUTION), line
        notebooks.solution_regions(cell.source)


def test_no_cell_relies_on_a_trailing_semicolon(lesson):
    for cell in notebooks.code_cells(lesson):
        code_lines = [
            line
            for line in cell.source.splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
        if code_lines:
            assert not code_lines[-1].rstrip().endswith(";"), f"trailing ';' in:\n{cell.source}"


def test_first_cell_checks_version_and_seeds(lesson):
    first = notebooks.code_cells(lesson)[0].source
    match = re.search(r"check_version\(\"([0-9.]+)\"\)", first)
    assert match, 'the first code cell must call check_version("X.Y.Z")'
    written_for = _parse(match.group(1))
    installed = _parse(pedaPEFT.__version__)
    assert written_for <= installed and written_for[0] == installed[0]
    assert re.search(r"seed_everything\(\d+\)", first), "the first code cell must seed"


def test_lesson_has_exercises(lesson):
    checks = [cell for cell in notebooks.code_cells(lesson) if notebooks.is_check_cell(cell.source)]
    solutions = [
        cell for cell in notebooks.code_cells(lesson) if notebooks.solution_regions(cell.source)
    ]
    assert len(checks) >= MINIMUM_EXERCISES and len(solutions) >= MINIMUM_EXERCISES


@pytest.mark.parametrize("source", SOURCES, ids=lesson_id)
def test_student_stubs_fail_with_a_hint_and_nothing_else_fails(source):
    student_path = source.parent / notebooks.STUDENT_DIR_NAME / source.with_suffix(".ipynb").name
    student = notebooks.load(student_path)
    executed = notebooks.execute(student, cwd=source.parent, allow_errors=True)
    for number, cell in enumerate(notebooks.code_cells(executed)):
        errors = [output for output in cell.outputs if output.output_type == "error"]
        if notebooks.is_check_cell(cell.source):
            assert errors, f"check cell {number} passed on the stub:\n{cell.source}"
            assert errors[0].ename == "ExerciseError", f"cell {number}: {errors[0].ename}"
            assert "Hint:" in errors[0].evalue, f"cell {number} gave no hint: {errors[0].evalue}"
        else:
            assert not errors, f"cell {number} failed in the student copy: {errors[0].evalue}"
