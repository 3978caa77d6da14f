"""Launching an autotuned Triton kernel with little host time.

``kernel[grid](*args)`` costs tens of microseconds of Python on every call: the autotuner's
dispatch, then the JIT binding the arguments, working out their specialization (which pointers
are 16-byte aligned, which integers are divisible by 16) and looking the compiled binary up. A
QLoRA training step launches a kernel twice per layer, so on an H200 that Python is a visible
part of the step. :func:`launch` pays it on the first two calls per key (the autotuner times its
configurations; the JIT compiles the chosen one) and afterwards launches the compiled binary
directly. A binary is reused only for the same caller's key (shapes, constants, device), the
same grid, and the same dtype and 16-byte alignment of every tensor argument, which is what the
JIT specializes on besides the integers the key holds.

That lookup (one ``data_ptr()`` per tensor, a hashed tuple), with the caller's own building of
arguments and key, still costs microseconds per launch, so :func:`launch` also returns the
*launcher* it used: a caller that can tell its next arguments specialize the same way (the same
tensor objects, say) calls it directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Grid = Callable[[dict[str, Any]], tuple[int, ...]]
Launcher = Callable[..., None]

_TUNED: dict[tuple, dict[str, Any]] = {}
"""Per caller's key: its constexprs and the autotuner's choice (constexprs, launch options)."""

_COMPILED: dict[tuple, Launcher | None] = {}
"""Per caller's key, grid and argument specialization: a function launching the compiled kernel
on the runtime arguments (``None``: this Triton launches through the JIT only)."""


def launch(kernel: Any, grid: Grid, args: tuple, constants: dict[str, Any],
           key: tuple) -> Launcher | None:
    """Run ``kernel`` (a ``triton.autotune`` over a ``triton.jit`` function) on ``args``.

    ``args`` are the kernel's leading positional parameters (tensors and runtime numbers; the
    integers the JIT specializes on must be part of ``key``), ``constants`` the constexprs the
    caller sets, and ``grid(meta)`` the launch grid given all constexprs, the tuned ones
    included. ``key`` must name everything else the compiled kernel depends on.

    Returns the launcher once the binary is compiled (from the second call per key on):
    ``launcher(*new_args)`` runs the same binary on the same grid, and is correct for any
    ``new_args`` with the same dtypes, 16-byte alignments and key. ``None`` before that, or
    where the installed Triton cannot launch a compiled binary directly.
    """
    tuned = _TUNED.get(key)
    if tuned is None:  # first call: the autotuner times its configurations, launches the best
        kernel[grid](*args, **constants)
        _TUNED[key] = {**constants, **kernel.best_config.all_kwargs()}
        return None
    blocks = (*grid(tuned), 1, 1)[:3]  # the grid on three axes
    specialization = (key, blocks, tuple((a.dtype, a.data_ptr() % 16 == 0) for a in args
                                         if isinstance(a, torch.Tensor)))
    if specialization in _COMPILED:
        launcher = _COMPILED[specialization]
        if launcher is None:
            kernel.fn[blocks](*args, **tuned)
        else:
            launcher(*args)
        return launcher
    compiled = kernel.fn[blocks](*args, **tuned)  # compiles on first use
    compiled = compiled.result() if hasattr(compiled, "result") else compiled
    names = getattr(kernel.fn, "arg_names", ())[len(args):]
    # Since Triton 3.3 a compiled kernel takes every parameter, constexprs included.
    direct = (_passes_constexprs() and hasattr(compiled, "__getitem__")
              and all(name in tuned for name in names))
    launcher = _direct(compiled, blocks, tuple(tuned[n] for n in names)) if direct else None
    _COMPILED[specialization] = launcher
    return launcher


def _direct(compiled: Any, blocks: tuple[int, int, int], tail: tuple[Any, ...]) -> Launcher:
    """``compiled`` on the grid ``blocks``, with the constexpr values ``tail`` appended."""
    run = compiled[blocks]

    def launcher(*args: Any) -> None:
        run(*args, *tail)

    return launcher


def _passes_constexprs() -> bool:
    try:
        import triton
    except ImportError:  # pragma: no cover - no kernel is launched without Triton
        return False
    major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    return (major, minor) >= (3, 3)
