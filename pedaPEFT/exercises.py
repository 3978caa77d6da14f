"""What an exercise cell calls: ``exercises.check(exercise_id, answer)``, and value checks.

:func:`check` looks the exercise up in :mod:`pedaPEFT.exercise_bank`, runs its behavioural
check on the answer (a function, a class or a value) and either prints ``"<title>: correct"``
or raises :class:`ExerciseError` with a hint that diagnoses the mistake. Whatever the answer
is — a stub, ``None``, a string, a function that crashes, a tensor of the wrong shape — the
student gets a hint, never a traceback from deep inside the check, and never the expected
value. Every result is recorded in the progress file (:mod:`pedaPEFT.progress`).

The older value helpers (``check_integer``, ``check_number``, ``check_array``,
``check_function``) take the expected value as an argument, so they suit only cells where the
value may be seen; lesson check cells call :func:`check`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from pedaPEFT import progress
from pedaPEFT.exercise_bank.base import Mistake

STUB_HINT = ("not answered yet: replace `...` or `raise NotImplementedError` with your code, "
             "run that cell, then this one.")
CRASH_HINT = ("your answer could not be checked: using it raised {error} inside the check. "
              "Compare its type, shape and dtype with what the exercise asks for.")


class ExerciseError(AssertionError):
    """An exercise answer is missing or wrong; the message holds a hint, never the answer."""


def _is_stub(answer: Any) -> bool:
    return answer is Ellipsis or answer is None


def _diagnose(exercise, answer: Any) -> tuple[str, str]:
    """Run the exercise's check on ``answer``; return (state, hint) with state in STATES."""
    if _is_stub(answer):
        return "stub", STUB_HINT
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            exercise.run(answer)
    except NotImplementedError:
        return "stub", STUB_HINT
    except Mistake as mistake:
        return "failed", str(mistake)
    except RecursionError:
        return "failed", CRASH_HINT.format(error="RecursionError")
    except Exception as error:  # a wrong answer of an unforeseen type: a hint, not a traceback
        return "failed", CRASH_HINT.format(error=type(error).__name__)
    return "passed", ""


def check(exercise_id: str, answer: Any) -> None:
    """Check ``answer`` for the exercise ``exercise_id``; print success or raise with a hint.

    Raises:
        ExerciseError: the answer is a stub or wrong; the message ends with ``Hint: ...``.
        ValueError: ``exercise_id`` names no exercise.

    Introduced in lesson 1, section "Exercises"; used again in lessons 2-11.
    """
    from pedaPEFT.exercise_bank import EXERCISES

    if exercise_id not in EXERCISES:
        raise ValueError(f"exercise_id must be one of the course's exercise ids "
                         f"(python -m pedaPEFT progress --list), got {exercise_id!r}")
    exercise = EXERCISES[exercise_id]
    state, hint = _diagnose(exercise, answer)
    progress.record(exercise_id, state, hint)
    if state == "passed":
        print(f"{exercise.title}: correct")
        return
    problem = "not answered yet" if state == "stub" else "not right yet"
    raise ExerciseError(f"{exercise_id} ({exercise.title}): {problem}.\nHint: {hint}") from None


# ---------------------------------------------------------------------------- value checks


def _fail(name: str, problem: str, hint: str) -> None:
    message = f"`{name}`: {problem}"
    if hint:
        message += f"\nHint: {hint}"
    raise ExerciseError(message)


def _require_filled(value: Any, name: str, hint: str) -> None:
    if value is Ellipsis:
        _fail(name, "still `...`: replace the stub with your answer.", hint)


def _as_scalar(value: Any) -> Any:
    """Unwrap a one-element tensor or array into a Python number; leave anything else alone."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.detach().to("cpu", torch.float64 if value.is_floating_point()
                                 else value.dtype).item()
    if isinstance(value, np.ndarray) and value.size == 1:
        return value.item()
    return value


def _as_float_array(value: Any) -> np.ndarray:
    """float64 NumPy copy of a tensor (any dtype, bf16 and requires_grad included) or array."""
    if isinstance(value, torch.Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"dtype {value.dtype}")
        return value.detach().to("cpu", torch.float64).numpy()
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"dtype {array.dtype}")
    return array.astype(np.float64)


def _finite_expected(expected: Any) -> float:
    number = float(expected)
    if not math.isfinite(number):
        raise ValueError(f"expected must be a finite number, got {expected!r}")
    return number


def check_integer(value: Any, expected: int, name: str, hint: str = "") -> None:
    """Pass if ``value`` is an integer (Python or NumPy) equal to ``expected``."""
    _require_filled(value, name, hint)
    if isinstance(expected, bool) or not isinstance(expected, (int, np.integer)):
        raise ValueError(f"expected must be an integer, got {expected!r}")
    try:
        value = _as_scalar(value)
    except Exception:
        _fail(name, f"expected an integer, got {type(value).__name__}.", hint)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        _fail(name, f"expected an integer, got {type(value).__name__}.", hint)
    if int(value) != int(expected):
        _fail(name, "this integer is not the expected one.", hint)
    print(f"`{name}` is correct.")


def check_number(
    value: Any, expected: float, name: str, rtol: float = 1e-6, atol: float = 0.0, hint: str = ""
) -> None:
    """Pass if ``value`` is finite and |value - expected| <= atol + rtol·|expected|.

    ``expected`` must itself be finite (a NaN would make every answer pass).
    """
    _require_filled(value, name, hint)
    target = _finite_expected(expected)
    try:
        value = _as_scalar(value)
    except Exception:
        _fail(name, f"expected a real number, got {type(value).__name__}.", hint)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        _fail(name, f"expected a real number, got {type(value).__name__}.", hint)
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range (10**400)
        number = math.inf if value > 0 else -math.inf
    if not math.isfinite(number):
        _fail(name, "expected a finite number of sensible size, got "
              f"{'an integer beyond float range' if isinstance(value, int) else number}.", hint)
    if abs(number - target) > atol + rtol * abs(target):
        side = "too large" if number > target else "too small"
        _fail(name, f"the value is {side}.", hint)
    print(f"`{name}` is correct.")


def check_array(
    value: Any, expected: Any, name: str, rtol: float = 1e-6, atol: float = 1e-8, hint: str = ""
) -> None:
    """Pass if ``value`` is an array (NumPy or torch) of the expected shape, close to ``expected``.

    The checks run in order: filled in, array type, shape, real dtype, finite, values; the
    first one that fails explains itself. Any float dtype (bf16 included) is compared in
    float64.
    """
    _require_filled(value, name, hint)
    if not isinstance(value, (np.ndarray, torch.Tensor)):
        _fail(name, f"expected a NumPy array or torch tensor, got {type(value).__name__}.", hint)
    target = _as_float_array(expected)
    if not np.all(np.isfinite(target)):
        raise ValueError("expected must hold only finite numbers (a NaN would fail every answer)")
    if tuple(value.shape) != target.shape:
        _fail(name, f"expected shape {target.shape}, got {tuple(value.shape)}.", hint)
    try:
        array = _as_float_array(value)
    except Exception:
        _fail(name, f"expected real numbers, got dtype {value.dtype}.", hint)
    if not np.all(np.isfinite(array)):
        _fail(name, "contains NaN or infinite entries.", hint)
    wrong = ~np.isclose(array, target, rtol=rtol, atol=atol)
    if wrong.any():
        _fail(name, f"{int(wrong.sum())} of {array.size} entries differ from the expected values.",
              hint)
    print(f"`{name}` is correct.")


def _default_compare(result: Any, expected: Any) -> bool:
    """Arrays: same shape and ``allclose`` in float64; integers: equal; other real numbers:
    ``isclose``; anything else: ``==`` giving a single truth value."""
    if isinstance(expected, (np.ndarray, torch.Tensor)):
        if not isinstance(result, (np.ndarray, torch.Tensor, list, tuple)):
            return False
        target = _as_float_array(expected)
        array = _as_float_array(result)
        return array.shape == target.shape and bool(np.allclose(array, target))
    if not isinstance(expected, bool) and isinstance(expected, (int, float, np.integer,
                                                                np.floating)):
        value = _as_scalar(result)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            return False
        if isinstance(expected, (int, np.integer)) and isinstance(value, (int, np.integer)):
            return int(value) == int(expected)
        return bool(np.isclose(float(value), float(expected), rtol=1e-9, atol=1e-12))
    same = result == expected
    return bool(same) if isinstance(same, (bool, np.bool_)) else False


def check_function(
    function: Any,
    cases: Sequence[tuple[tuple, Any]],
    name: str,
    compare: Callable[[Any, Any], bool] | None = None,
    hint: str = "",
) -> None:
    """Pass if ``function(*args)`` matches ``expected`` for every ``(args, expected)`` case.

    ``compare`` decides equality (default :func:`_default_compare`). If ``compare`` raises
    (a float64 result against a float32 reference, say), the default comparison decides. A
    failing case is reported by its number and argument shapes, not its expected output;
    an exception raised by the function or the comparison becomes a hint, not a traceback.
    """
    _require_filled(function, name, hint)
    if not callable(function):
        _fail(name, f"expected a function, got {type(function).__name__}.", hint)
    for number, (args, expected) in enumerate(cases, start=1):
        shapes = ", ".join(str(tuple(np.shape(arg))) if isinstance(arg, (np.ndarray, torch.Tensor))
                           else type(arg).__name__ for arg in args)
        raised = None
        try:
            result = function(*args)
        except NotImplementedError:
            raised = NotImplementedError
        except Exception as error:
            raised = type(error)
        if raised is NotImplementedError:
            _fail(name, "is not implemented yet: replace `raise NotImplementedError`.", hint)
        if raised is not None:
            _fail(name, f"raised {raised.__name__} on test case {number} (arguments: "
                  f"{shapes}).", hint)
        try:
            same = bool(compare(result, expected)) if compare is not None else None
        except Exception:
            same = None
        if same is None:
            try:
                same = _default_compare(result, expected)
            except Exception:
                same = False
        if not same:
            _fail(name, f"wrong result for test case {number} (arguments: {shapes}; result "
                  f"type {type(result).__name__}).", hint)
    print(f"`{name}` passes all {len(cases)} test cases.")
