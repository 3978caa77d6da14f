"""The course's exercises, by id: ``EXERCISES["05-lora-layer"]``.

One module per lesson (``lessonNN.py``) defines ``EXERCISES: list[Exercise]``; this module
imports each explicitly (no registration by side effect) and indexes them by id. The
framework — :class:`~pedaPEFT.exercise_bank.base.Exercise`, ``Mistake`` and the helpers a
check uses — is in :mod:`pedaPEFT.exercise_bank.base`.
"""

from pedaPEFT.exercise_bank import (
    lesson01,
    lesson02,
    lesson03,
    lesson04,
    lesson05,
    lesson06,
    lesson07,
    lesson08,
    lesson09,
    lesson10,
    lesson11,
    lesson12,
)
from pedaPEFT.exercise_bank.base import Exercise, Mistake

LESSON_MODULES = (lesson01, lesson02, lesson03, lesson04, lesson05,
                  lesson06, lesson07, lesson08, lesson09, lesson10, lesson11, lesson12)


def _index(modules) -> dict[str, Exercise]:
    exercises: dict[str, Exercise] = {}
    for module in modules:
        for exercise in module.EXERCISES:
            if exercise.id in exercises:
                raise ValueError(f"exercise id {exercise.id!r} is defined twice")
            exercises[exercise.id] = exercise
    return dict(sorted(exercises.items()))


EXERCISES: dict[str, Exercise] = _index(LESSON_MODULES)

__all__ = ["EXERCISES", "Exercise", "Mistake"]
