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


# ------------------------------------------------- any wrong answer gets a hint (issue family 15)

HINT = "look at the slide again"
MATRIX = np.arange(6.0).reshape(2, 3) + SECRET


def wrong_answers_for_an_array() -> list:
    return [
        None,
        MATRIX.T,  # transposed
        MATRIX.tolist(),
        float(SECRET),  # a scalar where an array is expected
        10**400,
        np.array([10**400]),  # object dtype
        np.full((2, 3), "a"),  # string array
        torch.from_numpy(2 * MATRIX).to(torch.bfloat16),
        torch.from_numpy(2 * MATRIX).float().requires_grad_(),
        torch.from_numpy(MATRIX).to(torch.complex64),
        torch.ones(2, 3, dtype=torch.bool),
        np.full((2, 3), np.inf),
        {"a": 1},
    ]


def wrong_answers_for_a_scalar() -> list:
    return [
        None,
        "0.3",
        np.array([0.3, 0.3]),  # an array where a scalar is expected
        torch.tensor([0.3, 0.3], requires_grad=True),
        torch.tensor(0.4, requires_grad=True),
        torch.tensor(0.4, dtype=torch.bfloat16),
        np.float32(0.4),
        10**400,
        -(10**400),
        1j,
        True,
        float("nan"),
        float("inf"),
        [0.3],
        object(),
    ]


def short_id(value) -> str:
    return " ".join(repr(value).split())[:40]


def assert_hint_without_answer(failure, *secrets: str) -> None:
    message = str(failure.value)
    assert f"Hint: {HINT}" in message
    for secret in (str(SECRET), *secrets):
        assert secret not in message


@pytest.mark.parametrize("answer", wrong_answers_for_a_scalar(), ids=short_id)
def test_check_number_wrong_answer_of_any_type_gets_a_hint(answer):
    with pytest.raises(ExerciseError) as failure:
        exercises.check_number(answer, expected=0.3, name="x", hint=HINT)
    assert_hint_without_answer(failure, "0.3")


@pytest.mark.parametrize("answer", [*wrong_answers_for_a_scalar(), 2.5, SECRET + 1,
                                    torch.tensor(2.0, requires_grad=True)], ids=short_id)
def test_check_integer_wrong_answer_of_any_type_gets_a_hint(answer):
    with pytest.raises(ExerciseError) as failure:
        exercises.check_integer(answer, expected=SECRET, name="n", hint=HINT)
    assert_hint_without_answer(failure)


@pytest.mark.parametrize("answer", wrong_answers_for_an_array(), ids=short_id)
def test_check_array_wrong_answer_of_any_type_gets_a_hint(answer):
    with pytest.raises(ExerciseError) as failure:
        exercises.check_array(answer, MATRIX, name="a", hint=HINT)
    assert_hint_without_answer(failure)


def torch_allclose(result, expected) -> bool:
    """A comparison an author might pass: raises on a shape or dtype mismatch or a non-tensor."""
    return torch.allclose(result, expected)


def returning(value):
    return lambda x: value


def raising(error: Exception):
    def function(x):
        raise error
    return function


FLOAT32_MATRIX = torch.from_numpy(MATRIX).float()
WRONG_FUNCTIONS = [
    ("transposed", lambda x: x.T, FLOAT32_MATRIX, torch_allclose),
    ("None", returning(None), FLOAT32_MATRIX, torch_allclose),
    ("float64, wrong", lambda x: 2 * x.double(), FLOAT32_MATRIX, torch_allclose),
    ("bf16, wrong", lambda x: (2 * x).bfloat16(), FLOAT32_MATRIX, None),
    ("requires grad", lambda x: (2 * x).requires_grad_(), MATRIX, None),
    ("string array", returning(np.full((2, 3), "a")), MATRIX, None),
    ("list of strings", returning(["a", "b"]), MATRIX, None),
    ("array for a scalar", returning(np.array([0.3, 0.3])), 0.3, None),
    ("tensor for a scalar", returning(torch.tensor([0.3, 0.3], requires_grad=True)), 0.3, None),
    ("10**400 for a float", returning(10**400), 0.3, None),
    ("10**400 for an int", returning(10**400), SECRET, None),
    ("array for an int", returning(np.array([SECRET, SECRET])), SECRET, None),
    ("string for a float", returning("0.3"), 0.3, None),
    ("0.1 + 0.2 for 0.4", returning(0.1 + 0.2), 0.4, None),
    ("raises ValueError", raising(ValueError("shapes")), MATRIX, None),
    ("raises ZeroDivisionError", raising(ZeroDivisionError()), 0.3, None),
    ("compare returns an array", lambda x: 2 * x, MATRIX, lambda r, e: r == e),
    ("compare raises", lambda x: 2 * x, MATRIX, raising(RuntimeError("boom"))),
]


@pytest.mark.parametrize(("function", "expected", "compare"),
                         [case[1:] for case in WRONG_FUNCTIONS],
                         ids=[case[0] for case in WRONG_FUNCTIONS])
def test_check_function_wrong_answer_of_any_type_gets_a_hint(function, expected, compare):
    argument = FLOAT32_MATRIX if isinstance(expected, torch.Tensor) else MATRIX
    with pytest.raises(ExerciseError) as failure:
        exercises.check_function(function, [((argument,), expected)], "f", compare=compare,
                                 hint=HINT)
    assert_hint_without_answer(failure)


@pytest.mark.parametrize(("function", "expected", "compare"), [
    (lambda x: x.double(), FLOAT32_MATRIX, torch_allclose),  # float64 for a float32 reference
    (lambda x: x.clone().requires_grad_(), FLOAT32_MATRIX, None),
    (lambda x: x.bfloat16(), torch.arange(6.0).reshape(2, 3), None),  # exact in bf16
    (returning(0.1 + 0.2), 0.3, None),
    (returning(torch.tensor(0.3, dtype=torch.float64, requires_grad=True)), 0.3, None),
    (returning(np.int64(SECRET)), SECRET, None),
], ids=["float64", "requires grad", "bf16", "0.1 + 0.2", "scalar tensor", "numpy int"])
def test_check_function_accepts_right_answers_of_another_type(function, expected, compare, capsys):
    argument = expected if isinstance(expected, torch.Tensor) else MATRIX
    exercises.check_function(function, [((argument,), expected)], "f", compare=compare)
    assert "`f` passes all 1 test cases." in capsys.readouterr().out


def test_right_answers_in_bf16_and_with_grad_pass(capsys):
    exact = torch.arange(6.0).reshape(2, 3)
    exercises.check_array(exact.bfloat16(), exact.numpy(), name="a")
    exercises.check_array(exact.clone().requires_grad_(), exact, name="a")
    exercises.check_number(torch.tensor(0.3, dtype=torch.float64, requires_grad=True), 0.3, "x")
    exercises.check_integer(torch.tensor(SECRET), SECRET, "n")
    assert capsys.readouterr().out.count("is correct.") == 4


@pytest.mark.parametrize("expected", [float("nan"), float("inf"), np.float32("nan"),
                                      torch.tensor(float("nan"))], ids=short_id)
@pytest.mark.parametrize("answer", [0.3, float("nan")], ids=short_id)
def test_check_number_refuses_a_non_finite_expected_value(answer, expected):
    with pytest.raises(ValueError, match="expected must be a finite number"):
        exercises.check_number(answer, expected=expected, name="x")


def test_check_array_and_check_integer_refuse_a_bad_expected_value():
    with pytest.raises(ValueError, match="expected must"):
        exercises.check_array(np.zeros(2), expected=np.array([0.0, np.nan]), name="a")
    with pytest.raises(ValueError, match="expected must be an integer"):
        exercises.check_integer(3, expected=float("nan"), name="n")
