"""Exercises of lessons 6-10: solutions pass, stubs fail, every planted bug gets its own hint."""

import importlib.util
from pathlib import Path

import pytest
import torch

from pedaPEFT import notebooks
from pedaPEFT.exercise_bank import lesson06, lesson07, lesson08, lesson09, lesson10
from pedaPEFT.exercise_bank.base import Mistake

BUGS_DIR = Path(__file__).parent / "exercise_bugs"
LESSONS = {6: lesson06, 7: lesson07, 8: lesson08, 9: lesson09, 10: lesson10}


def _bug_module(lesson: int):
    path = BUGS_DIR / f"lesson{lesson:02d}.py"
    spec = importlib.util.spec_from_file_location(f"exercise_bugs_6_10_{lesson:02d}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUG_MODULES = {lesson: _bug_module(lesson) for lesson in LESSONS}
EXERCISES = {ex.id: ex for module in LESSONS.values() for ex in module.EXERCISES}
CODE = sorted(ex.id for ex in EXERCISES.values() if ex.kind == "code")
BUG_CASES = [
    pytest.param(exercise_id, number, bug, hint, id=f"{exercise_id}-{number}")
    for module in BUG_MODULES.values()
    for exercise_id, bugs in module.BUGS.items()
    for number, (bug, hint) in enumerate(bugs)
]


def _solution(exercise_id: str):
    return BUG_MODULES[EXERCISES[exercise_id].lesson].SOLUTIONS[exercise_id]


def test_every_lesson_has_two_code_exercises_with_two_bugs_each():
    for lesson, module in LESSONS.items():
        ids = [ex.id for ex in module.EXERCISES]
        assert all(ex.lesson == lesson and ex.id.startswith(f"{lesson:02d}-")
                   for ex in module.EXERCISES)
        code = [ex.id for ex in module.EXERCISES if ex.kind == "code"]
        assert len(code) >= 2 and len(ids) >= 3 and len(set(ids)) == len(ids)
        for exercise_id in code:
            assert len(BUG_MODULES[lesson].BUGS.get(exercise_id, [])) >= 2, exercise_id


@pytest.mark.parametrize("exercise_id", sorted(EXERCISES))
def test_solution_passes(exercise_id):
    EXERCISES[exercise_id].run(_solution(exercise_id))


@pytest.mark.parametrize("exercise_id", CODE)
def test_stub_raises_not_implemented(exercise_id):
    def stub(*args, **kwargs):
        raise NotImplementedError("YOUR CODE HERE")

    with pytest.raises((NotImplementedError, Mistake)):
        EXERCISES[exercise_id].run(stub)


@pytest.mark.parametrize(("exercise_id", "number", "bug", "hint"), BUG_CASES)
def test_planted_bug_gets_its_hint(exercise_id, number, bug, hint):
    with pytest.raises(Mistake) as failure:
        EXERCISES[exercise_id].run(bug)
    assert hint in str(failure.value)


def test_student_stub_keeps_the_decorators_of_a_method():
    source = ("class F(torch.autograd.Function):\n"
              "    ### BEGIN SOLUTION\n"
              "    @staticmethod\n"
              "    def forward(ctx, x):\n"
              '        """Twice x."""\n'
              "        return 2 * x\n"
              "    ### END SOLUTION\n")
    stub = notebooks.strip_solutions(source)
    assert "    @staticmethod\n    def forward(ctx, x):\n" in stub
    namespace = {"torch": torch}
    exec(stub, namespace)
    with pytest.raises(NotImplementedError):
        namespace["F"].apply(torch.ones(1))
