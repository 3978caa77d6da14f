"""The exercise bank, mutation-tested: for every exercise the lesson's solution passes, the stub
fails with the generic hint, every planted bug (tests/exercise_bugs/lessonNN.py) fails with its
own hint, and no student notebook shows an expected value.

Solutions are taken from the lesson scripts themselves: the cell that holds the solution region
defining the checked name is executed after the lesson's setup cell and the imports before it.
Number exercises depend on the lesson's state, so their solutions are proven by the strict nbval
run instead.
"""

import ast
import importlib.util
import re
from pathlib import Path

import jupytext
import pytest

from pedaPEFT import exercises, notebooks
from pedaPEFT.exercise_bank import EXERCISES, base
from pedaPEFT.exercises import ExerciseError

REPO = Path(__file__).resolve().parent.parent
LESSONS = notebooks.LESSONS_DIR
CHECK_CALL = re.compile(r"exercises\.check\(\s*\"([^\"]+)\"\s*,\s*(\w+)\s*\)")
MIN_BUGS_PER_CODE_EXERCISE = 2


def lesson_script(lesson: int) -> Path:
    (script,) = LESSONS.glob(f"{lesson:02d}_*.py")
    return script


def code_cells(script: Path) -> list[str]:
    notebook = jupytext.read(script, fmt="py:percent")
    return [cell.source for cell in notebook.cells if cell.cell_type == "code"]


def check_calls(script: Path) -> dict[str, str]:
    """exercise id -> the name the lesson's check cell passes."""
    return {ident: name for source in code_cells(script) for ident, name in
            CHECK_CALL.findall(source)}


def defines(source: str, name: str) -> bool:
    return re.search(rf"^(def|class) {name}\b|^{name}\s*=", source, re.MULTILINE) is not None


def imports_of(source: str) -> str:
    """The top-level import statements of a cell, one per line."""
    tree = ast.parse(source)
    return "\n".join(ast.unparse(node) for node in tree.body
                     if isinstance(node, (ast.Import, ast.ImportFrom)))


def answer_from_lesson(exercise_id: str, student: bool = False):
    """Execute the lesson's setup cell, the imports of the cells before the solution cell of
    ``exercise_id``, then that cell; return the checked name's value (``student``: from the
    stubbed cell, as in lessons/student/)."""
    exercise = EXERCISES[exercise_id]
    script = lesson_script(exercise.lesson)
    name = check_calls(script)[exercise_id]
    cells = code_cells(script)
    (position,) = [number for number, source in enumerate(cells)
                   if notebooks.solution_regions(source) and defines(source, name)]
    solution = cells[position]
    if student:
        solution = notebooks.strip_solutions(solution)
    namespace: dict = {}
    exec(compile(cells[0], f"{script.name}[setup cell]", "exec"), namespace)
    imports = "\n".join(imports_of(source) for source in cells[1:position])
    exec(compile(imports, f"{script.name}[imports]", "exec"), namespace)
    exec(compile(solution, f"{script.name}[{name}]", "exec"), namespace)
    return namespace[name]


def bug_modules():
    """Every tests/exercise_bugs/lessonNN.py, loaded from its file."""
    modules = []
    for path in sorted((REPO / "tests" / "exercise_bugs").glob("lesson[0-9][0-9].py")):
        spec = importlib.util.spec_from_file_location(f"exercise_bugs_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules.append(module)
    return modules


BUGS = [(ident, number, bug, hint)
        for module in bug_modules()
        for ident, bugs in module.BUGS.items()
        for number, (bug, hint) in enumerate(bugs)]
CODE = sorted(ident for ident, exercise in EXERCISES.items() if exercise.kind == "code")
LESSONS_WITH_BANK = sorted({exercise.lesson for exercise in EXERCISES.values()})


def test_the_bank_accepts_exactly_the_lessons_that_exist():
    numbers = [int(path.name[:2]) for path in notebooks.lesson_sources()]
    assert list(base.LESSONS) == numbers


def test_every_exercise_has_exactly_one_check_cell_in_its_lesson():
    for ident, exercise in EXERCISES.items():
        script = lesson_script(exercise.lesson)
        calls = [found for source in code_cells(script) for found in CHECK_CALL.findall(source)
                 if found[0] == ident]
        assert len(calls) == 1, f"{ident}: {len(calls)} check cells in {script.name}"


@pytest.mark.parametrize("lesson", LESSONS_WITH_BANK)
def test_lessons_with_bank_exercises_have_two_code_exercises_and_only_bank_checks(lesson):
    assert sum(e.kind == "code" for e in EXERCISES.values() if e.lesson == lesson) >= 2
    for source in code_cells(lesson_script(lesson)):
        if notebooks.is_check_cell(source):
            assert CHECK_CALL.fullmatch(source.strip()), f"not one exercises.check call:\n{source}"


@pytest.mark.parametrize("exercise_id", CODE)
def test_solution_passes(exercise_id, capsys):
    exercises.check(exercise_id, answer_from_lesson(exercise_id))
    assert f"{EXERCISES[exercise_id].title}: correct" in capsys.readouterr().out


@pytest.mark.parametrize("exercise_id", CODE)
def test_stub_fails_with_the_generic_hint(exercise_id):
    stub = answer_from_lesson(exercise_id, student=True)
    with pytest.raises(ExerciseError) as failure:
        exercises.check(exercise_id, stub)
    assert exercises.STUB_HINT in str(failure.value)


@pytest.mark.parametrize("exercise_id", sorted(EXERCISES))
@pytest.mark.parametrize("stub", [..., None])
def test_empty_answers_get_the_generic_hint(exercise_id, stub):
    with pytest.raises(ExerciseError, match="Hint: not answered yet"):
        exercises.check(exercise_id, stub)


def test_every_code_exercise_has_planted_bugs():
    counts = {ident: 0 for ident in CODE}
    for ident, _, _, _ in BUGS:
        assert ident in EXERCISES, f"planted bug for unknown exercise {ident}"
        counts[ident] = counts.get(ident, 0) + 1
    short = {ident: n for ident, n in counts.items() if n < MIN_BUGS_PER_CODE_EXERCISE}
    assert not short, f"fewer than {MIN_BUGS_PER_CODE_EXERCISE} planted bugs: {short}"


@pytest.mark.parametrize(("exercise_id", "number", "bug", "hint"), BUGS,
                         ids=[f"{ident}-{number}" for ident, number, _, _ in BUGS])
def test_planted_bug_is_caught_by_its_own_hint(exercise_id, number, bug, hint):
    with pytest.raises(ExerciseError) as failure:
        exercises.check(exercise_id, bug)
    message = str(failure.value)
    assert hint in message, f"bug {number} of {exercise_id} got: {message}"
    for secret in EXERCISES[exercise_id].secrets():
        assert secret not in message


@pytest.mark.parametrize("exercise_id", sorted(EXERCISES))
@pytest.mark.parametrize("answer", ["a string", 3, 2.5, -1, [1, 2], object(), lambda *a: None])
def test_any_wrong_answer_gets_a_hint_not_a_traceback(exercise_id, answer):
    try:
        exercises.check(exercise_id, answer)
    except ExerciseError as error:
        assert "Hint: " in str(error)


def test_no_student_notebook_shows_an_expected_value():
    students = {path.name: path.read_text(encoding="utf-8")
                for path in sorted((LESSONS / notebooks.STUDENT_DIR_NAME).glob("*.ipynb"))}
    for ident, exercise in EXERCISES.items():
        secrets = exercise.secrets()
        assert all(isinstance(s, str) and len(s) >= 3 for s in secrets), ident
        for name, text in students.items():
            for secret in secrets:
                assert secret not in text, f"{name} shows a value of {ident}"


@pytest.mark.parametrize("lesson", LESSONS_WITH_BANK)
def test_student_check_cells_pass_no_expected_value(lesson):
    student = notebooks.load(LESSONS / notebooks.STUDENT_DIR_NAME /
                             lesson_script(lesson).with_suffix(".ipynb").name)
    for cell in notebooks.code_cells(student):
        if notebooks.is_check_cell(cell.source):
            assert "expected" not in cell.source
            assert "exercises.check_" not in cell.source
