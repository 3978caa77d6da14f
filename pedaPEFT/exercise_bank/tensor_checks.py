"""Small checks shared by the exercises of lessons 6-10 (quantization, QLoRA, paged AdamW).

Each helper raises :class:`Mistake` with a hint that names what is wrong (type, shape, dtype,
a failing call), never the expected values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pedaPEFT.exercise_bank.base import Mistake


def call(function: Callable[..., Any], *args: Any, when_it_fails: str, **kwargs: Any) -> Any:
    """``function(*args, **kwargs)``; an exception (other than a stub's) becomes a Mistake.

    ``NotImplementedError`` passes through untouched, so an unfilled stub gets the generic hint.
    """
    if not callable(function):
        raise Mistake(f"expected a function or class, got {type(function).__name__}")
    try:
        return function(*args, **kwargs)
    except NotImplementedError:
        raise
    except Mistake:
        raise
    except Exception as error:  # a wrong answer may fail in any way; name the case instead
        raise Mistake(f"{when_it_fails} (it raised {type(error).__name__})") from None


def tensor(value: Any, name: str, shape: tuple[int, ...] | torch.Size | None = None,
           dtype: torch.dtype | None = None, hint: str = "") -> torch.Tensor:
    """``value`` checked to be a torch tensor of the given shape and dtype."""
    if not isinstance(value, torch.Tensor):
        raise Mistake(f"{name} must be a torch.Tensor, got {type(value).__name__}. {hint}".strip())
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise Mistake(
            f"{name} has shape {tuple(value.shape)}, expected {tuple(shape)}. {hint}".strip()
        )
    if dtype is not None and value.dtype != dtype:
        raise Mistake(f"{name} has dtype {value.dtype}, expected {dtype}. {hint}".strip())
    return value.detach()


def pair(value: Any, names: str) -> tuple[Any, ...]:
    """``value`` checked to be a tuple (or list) with one entry per comma-separated name."""
    count = len(names.split(","))
    if not isinstance(value, tuple | list) or len(value) != count:
        raise Mistake(f"return a tuple ({names}) of {count} values, got {type(value).__name__}")
    return tuple(value)


def finite(value: torch.Tensor, name: str, hint: str) -> None:
    """Raise unless every entry is finite (the hint says where NaN usually comes from)."""
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise Mistake(f"{name} contains NaN or Inf: {hint}")


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-7) -> bool:
    """Same shape and ``|a - b| <= atol + rtol |b|`` everywhere (float64 comparison)."""
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol)


def seeded(seed: int) -> torch.Generator:
    """A CPU generator with a fixed seed: every check sees the same random inputs."""
    return torch.Generator().manual_seed(seed)
