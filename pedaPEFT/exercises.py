"""Check helpers for exercise cells.

Each helper compares a learner's answer with the expected one and, when they differ, raises
:class:`ExerciseError` with a hint: what type, shape or range was expected and where to look.
A hint never contains the expected value itself, so a failing check does not give the answer
away. Unfilled stubs (``name = ...``) get their own message.
"""

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch


class ExerciseError(AssertionError):
    """An exercise answer is missing or wrong; the message holds a hint, never the answer."""


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
        return value.item()
    if isinstance(value, np.ndarray) and value.size == 1:
        return value.item()
    return value


def check_integer(value: Any, expected: int, name: str, hint: str = "") -> None:
    """Pass if ``value`` is an integer (Python or NumPy) equal to ``expected``."""
    _require_filled(value, name, hint)
    value = _as_scalar(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        _fail(name, f"expected an integer, got {type(value).__name__}.", hint)
    if int(value) != int(expected):
        _fail(name, "this integer is not the expected one.", hint)
    print(f"`{name}` is correct.")


def check_number(
    value: Any, expected: float, name: str, rtol: float = 1e-6, atol: float = 0.0, hint: str = ""
) -> None:
    """Pass if ``value`` is finite and |value - expected| <= atol + rtol·|expected|."""
    _require_filled(value, name, hint)
    value = _as_scalar(value)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        _fail(name, f"expected a real number, got {type(value).__name__}.", hint)
    if not np.isfinite(value):
        _fail(name, f"expected a finite number, got {value}.", hint)
    if abs(float(value) - float(expected)) > atol + rtol * abs(float(expected)):
        side = "too large" if value > expected else "too small"
        _fail(name, f"the value is {side}.", hint)
    print(f"`{name}` is correct.")


def check_array(
    value: Any, expected: Any, name: str, rtol: float = 1e-6, atol: float = 1e-8, hint: str = ""
) -> None:
    """Pass if ``value`` is an array (NumPy or torch) of the expected shape, close to ``expected``.

    The checks run in order: filled in, array type, shape, finite, values; the first one that
    fails explains itself.
    """
    _require_filled(value, name, hint)
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        _fail(name, f"expected a NumPy array or torch tensor, got {type(value).__name__}.", hint)
    expected = np.asarray(
        expected.detach().cpu().numpy() if isinstance(expected, torch.Tensor) else expected
    )
    if value.shape != expected.shape:
        _fail(name, f"expected shape {expected.shape}, got {value.shape}.", hint)
    if value.dtype.kind not in "biuf":
        _fail(name, f"expected real numbers, got dtype {value.dtype}.", hint)
    if not np.all(np.isfinite(value)):
        _fail(name, "contains NaN or infinite entries.", hint)
    wrong = ~np.isclose(value, expected, rtol=rtol, atol=atol)
    if wrong.any():
        _fail(name, f"{int(wrong.sum())} of {value.size} entries differ from the expected values.",
              hint)
    print(f"`{name}` is correct.")


def check_function(
    function: Any,
    cases: Sequence[tuple[tuple, Any]],
    name: str,
    compare: Callable[[Any, Any], bool] | None = None,
    hint: str = "",
) -> None:
    """Pass if ``function(*args)`` matches ``expected`` for every ``(args, expected)`` case.

    ``compare`` decides equality (default: ``numpy.allclose`` for arrays, ``==`` otherwise).
    A failing case is reported by its number and argument shapes, not its expected output.
    """
    _require_filled(function, name, hint)
    if not callable(function):
        _fail(name, f"expected a function, got {type(function).__name__}.", hint)
    for number, (args, expected) in enumerate(cases, start=1):
        try:
            result = function(*args)
        except NotImplementedError:
            _fail(name, "is not implemented yet: replace `raise NotImplementedError`.", hint)
        if compare is not None:
            same = compare(result, expected)
        elif isinstance(expected, (np.ndarray, torch.Tensor)):
            result_array = np.asarray(result)
            same = result_array.shape == np.shape(expected) and np.allclose(
                result_array, np.asarray(expected)
            )
        else:
            same = result == expected
        if not same:
            shapes = ", ".join(str(tuple(np.shape(arg))) for arg in args)
            _fail(name, f"wrong result for test case {number} (argument shapes: {shapes}).", hint)
    print(f"`{name}` passes all {len(cases)} test cases.")
