"""Exercise checks: they pass right answers, and fail wrong ones with a hint, never the answer."""

import numpy as np
import pytest
import torch

from pedaPEFT import exercises
from pedaPEFT.exercises import ExerciseError

SECRET = 987654


def test_check_integer_passes_and_prints(capsys):
    exercises.check_integer(np.int64(SECRET), expected=SECRET, name="n")
    exercises.check_integer(torch.tensor(SECRET), expected=SECRET, name="n")
    assert "`n` is correct." in capsys.readouterr().out


@pytest.mark.parametrize("answer", [..., SECRET + 1, 2.5, "987654", True, None])
def test_check_integer_fails_without_revealing_the_answer(answer):
    with pytest.raises(ExerciseError) as failure:
        exercises.check_integer(answer, expected=SECRET, name="n", hint="count the pivots")
    message = str(failure.value)
    assert "Hint: count the pivots" in message and str(SECRET) not in message


def test_check_number_tolerance_and_direction():
    exercises.check_number(0.1 + 0.2, expected=0.3, name="x")
    with pytest.raises(ExerciseError, match="too large"):
        exercises.check_number(0.31, expected=0.3, name="x", hint="h")
    with pytest.raises(ExerciseError, match="too small"):
        exercises.check_number(0.29, expected=0.3, name="x", hint="h")
    with pytest.raises(ExerciseError, match="finite"):
        exercises.check_number(float("nan"), expected=0.3, name="x", hint="h")


def test_check_array_reports_shape_then_values():
    expected = np.arange(6.0).reshape(2, 3)
    exercises.check_array(torch.arange(6.0).reshape(2, 3), expected, name="a")
    with pytest.raises(ExerciseError, match=r"expected shape \(2, 3\), got \(3, 2\)"):
        exercises.check_array(expected.T, expected, name="a", hint="h")
    with pytest.raises(ExerciseError, match="1 of 6 entries differ"):
        wrong = expected.copy()
        wrong[1, 2] = -1
        exercises.check_array(wrong, expected, name="a", hint="h")
    with pytest.raises(ExerciseError, match="NumPy array"):
        exercises.check_array([[0, 1, 2], [3, 4, 5]], expected, name="a", hint="h")
    with pytest.raises(ExerciseError, match="NaN"):
        exercises.check_array(np.full((2, 3), np.nan), expected, name="a", hint="h")


def test_check_function_cases_and_stub():
    exercises.check_function(lambda x: 2 * x, [((1,), 2), ((np.ones(2),), np.full(2, 2.0))], "f")
    with pytest.raises(ExerciseError, match="test case 2"):
        exercises.check_function(lambda x: x + 1, [((1,), 2), ((2,), 4)], "f", hint="h")

    def stub(x):
        raise NotImplementedError("YOUR CODE HERE")

    with pytest.raises(ExerciseError, match="not implemented yet"):
        exercises.check_function(stub, [((1,), 2)], "f", hint="h")
    with pytest.raises(ExerciseError, match="expected a function"):
        exercises.check_function(3, [((1,), 2)], "f", hint="h")
