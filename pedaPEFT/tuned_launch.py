"""Launching an autotuned Triton kernel with little host time.

``kernel[grid](*args)`` costs tens of microseconds of Python on every call: the autotuner's
dispatch, then the JIT binding the arguments, working out their specialization (which pointers
are 16-byte aligned, which integers are divisible by 16) and looking the compiled binary up. A
QLoRA training step launches a kernel twice per layer, so on an H200 that Python is a visible
part of the step. :func:`launch` pays it on the first two calls per key (the autotuner times its
configurations; the JIT compiles the chosen one) and afterwards launches the compiled binary
directly. A binary is reused only for the same caller's key (shapes, constants, device) and the
same dtype and 16-byte alignment of every tensor argument, which is what the JIT specializes on
besides the integers the key holds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Grid = Callable[[dict[str, Any]], tuple[int, ...]]

_TUNED: dict[tuple, dict[str, Any]] = {}
"""Per caller's key: its constexprs and the autotuner's choice (constexprs, launch options)."""

_COMPILED: dict[tuple, tuple[Any, tuple[Any, ...]] | None] = {}
"""Per caller's key and argument specialization: the compiled kernel and the constexpr values
that follow the runtime arguments, in signature order (``None``: launch through the JIT)."""


def launch(kernel: Any, grid: Grid, args: tuple, constants: dict[str, Any], key: tuple) -> None:
    """Run ``kernel`` (a ``triton.autotune`` over a ``triton.jit`` function) on ``args``.

    ``args`` are the kernel's leading positional parameters (tensors and runtime numbers; the
    integers the JIT specializes on must be part of ``key``), ``constants`` the constexprs the
    caller sets, and ``grid(meta)`` the launch grid given all constexprs, the tuned ones
    included. ``key`` must name everything else the compiled kernel depends on.
    """
    tuned = _TUNED.get(key)
    if tuned is None:  # first call: the autotuner times its configurations, launches the best
        kernel[grid](*args, **constants)
        _TUNED[key] = {**constants, **kernel.best_config.all_kwargs()}
        return
    blocks = (*grid(tuned), 1, 1)[:3]  # the grid on three axes
    specialization = (key, tuple((a.dtype, a.data_ptr() % 16 == 0) for a in args
                                 if isinstance(a, torch.Tensor)))
    if specialization in _COMPILED:
        found = _COMPILED[specialization]
        if found is not None:
            compiled, tail = found
            compiled[blocks](*args, *tail)
            return
        kernel.fn[blocks](*args, **tuned)
        return
    compiled = kernel.fn[blocks](*args, **tuned)  # compiles on first use
    compiled = compiled.result() if hasattr(compiled, "result") else compiled
    names = getattr(kernel.fn, "arg_names", ())[len(args):]
    # Since Triton 3.3 a compiled kernel takes every parameter, constexprs included.
    direct = (_passes_constexprs() and hasattr(compiled, "__getitem__")
              and all(name in tuned for name in names))
    _COMPILED[specialization] = (compiled, tuple(tuned[n] for n in names)) if direct else None


def _passes_constexprs() -> bool:
    try:
        import triton
    except ImportError:  # pragma: no cover - no kernel is launched without Triton
        return False
    major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    return (major, minor) >= (3, 3)
