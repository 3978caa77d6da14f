"""What an exercise is, and the helpers its check uses to test a student's answer.

An :class:`Exercise` pairs a one-line task with ``run(answer)``: it returns ``None`` when the
answer is right and raises :class:`Mistake` with a diagnosing hint when it is wrong. ``run``
tests behaviour — properties and seeded random inputs compared with the package's reference
modules — so no single expected value ever needs to appear in a notebook. A hint names the
mistake ("B is not zero at initialisation"), never the expected value.

``call`` runs the student's code: an exception raised there becomes a :class:`Mistake` that
says what was called and what it raised, while ``NotImplementedError`` (an unfilled stub)
passes through to :func:`pedaPEFT.exercises.check`, which answers it with the generic hint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

KINDS = ("code", "number")
LESSONS = range(1, 13)
"""The course's lesson numbers; a test keeps it equal to the lesson scripts in ``lessons/``."""


class Mistake(Exception):
    """A wrong answer; the message is a hint that diagnoses it and never holds the answer."""


@dataclass(frozen=True)
class Exercise:
    """One exercise of a lesson.

    Attributes:
        id: ``"LL-slug"``, ``LL`` the lesson's two digits (``"05-lora-layer"``).
        lesson: the lesson number, one of ``LESSONS``.
        title: one line: what the student writes.
        kind: ``"code"`` (a function or class) or ``"number"`` (arithmetic).
        run: checks an answer; returns ``None`` or raises :class:`Mistake`.
        secrets: the formatted expected values that must never appear in a student notebook.
    """

    id: str
    lesson: int
    title: str
    kind: str
    run: Callable[[Any], None]
    secrets: Callable[[], list[str]] = field(default=lambda: [])

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not (isinstance(self.lesson, int) and self.lesson in LESSONS):
            raise ValueError(f"lesson must be an integer in {LESSONS.start}..{LESSONS.stop - 1}, "
                             f"got {self.lesson!r}")
        if not self.id.startswith(f"{self.lesson:02d}-"):
            raise ValueError(f"id must start with the lesson's two digits, got {self.id!r}")


def call(function: Any, *args: Any, name: str = "your code", **kwargs: Any) -> Any:
    """``function(*args, **kwargs)``; an exception it raises becomes a :class:`Mistake`.

    ``NotImplementedError`` passes through untouched: it marks an unfilled stub.
    """
    if not callable(function):
        raise Mistake(f"{name} must be callable (a function or class), got "
                      f"{type(function).__name__}.")
    try:
        return function(*args, **kwargs)
    except NotImplementedError:
        raise
    except Mistake:
        raise
    except Exception as error:  # the student's code failed: say where, keep the message short
        message = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise Mistake(f"calling {name} raised {type(error).__name__}"
                      + (f": {message}" if message else "") + ".") from None


def as_float_array(value: Any, name: str) -> np.ndarray:
    """A float64 NumPy array from a NumPy array or tensor (any float dtype, bf16 included)."""
    if isinstance(value, torch.Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise Mistake(f"{name} must hold real numbers, got a {value.dtype} tensor.")
        return value.detach().to("cpu", torch.float64).numpy()
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise Mistake(f"{name} must hold real numbers, got dtype {value.dtype}.")
        return value.astype(np.float64)
    raise Mistake(f"{name} must be a NumPy array or a torch tensor, got {type(value).__name__}.")


def as_tensor(value: Any, name: str) -> torch.Tensor:
    """A tensor (not detached) from a tensor or NumPy array, else a :class:`Mistake`."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return torch.from_numpy(value)
    raise Mistake(f"{name} must be a torch tensor, got {type(value).__name__}.")


def as_real(value: Any, name: str) -> float:
    """A finite Python float from a number, a 0-d/one-element array or tensor."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        size = value.size if isinstance(value, np.ndarray) else value.numel()
        if size != 1:
            raise Mistake(f"{name} must be one number, got an array of shape "
                          f"{tuple(value.shape)}.")
        value = as_float_array(value, name).item()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise Mistake(f"{name} must be a number, got {type(value).__name__}.")
    try:
        number = float(value)
    except OverflowError:
        raise Mistake(f"{name} is far too large to be right.") from None
    if not np.isfinite(number):
        raise Mistake(f"{name} must be a finite number, got {number}.")
    return number


def as_int(value: Any, name: str) -> int:
    """A Python int from an int, NumPy integer or one-element integer array/tensor."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        size = value.size if isinstance(value, np.ndarray) else value.numel()
        if size != 1:
            raise Mistake(f"{name} must be one integer, got an array of shape "
                          f"{tuple(value.shape)}.")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise Mistake(f"{name} must be an integer, got {type(value).__name__}.")
    return int(value)


def close(a: np.ndarray, b: np.ndarray, rtol: float = 1e-6, atol: float = 1e-8) -> bool:
    """Same shape and all entries within ``atol + rtol·|b|``."""
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=rtol, atol=atol))
